//! What the host's apt configuration says: its suite, and the mirror debootstrap should use.

use std::path::Path;

/// One `deb` source of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// The archive URI.
    pub uri: String,
    /// Its suites.
    pub suites: Vec<String>,
}

/// The host's `VERSION_CODENAME` from `/etc/os-release`.
pub fn host_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("VERSION_CODENAME=")
            .map(|v| v.trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    })
}

/// Parses one-line-style `sources.list` text.
pub fn parse_list(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        // Options: "[arch=amd64 signed-by=...]" possibly over several words.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        if let [uri, suite, ..] = rest.as_slice() {
            out.push(AptSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// Parses deb822 `.sources` text.
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = Vec::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let words = || v.split_whitespace().map(str::to_string);
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = words().collect(),
                "uris" => uris = words().collect(),
                "suites" => suites = words().collect(),
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if enabled && types.iter().any(|t| t == "deb") {
            for uri in uris {
                out.push(AptSource {
                    uri,
                    suites: suites.clone(),
                });
            }
        }
    }
    out
}

/// Every `deb` source of the host, in apt's order.
pub fn host_sources() -> Vec<AptSource> {
    let mut out = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        out.extend(parse_list(&t));
    }
    let dir = Path::new("/etc/apt/sources.list.d");
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let Ok(t) = std::fs::read_to_string(&p) else {
                continue;
            };
            match p.extension().and_then(|e| e.to_str()) {
                Some("list") => out.extend(parse_list(&t)),
                Some("sources") => out.extend(parse_deb822(&t)),
                _ => {}
            }
        }
    }
    out
}

/// The mirror for `suite`: a source listing that suite, else one listing a main suite
/// (no `-security`/`-updates` suffix). `None`: let debootstrap use its default.
pub fn pick_mirror(sources: &[AptSource], suite: &str) -> Option<String> {
    let main = |s: &AptSource| {
        s.suites
            .iter()
            .any(|x| !x.contains('-') && !x.contains('/'))
    };
    sources
        .iter()
        .find(|s| s.suites.iter().any(|x| x == suite))
        .or_else(|| sources.iter().find(|s| main(s)))
        .map(|s| s.uri.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn parses_both_formats_and_picks_main_suite() {
        let list = "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://m.invalid/debian bookworm main\n\
                    deb http://s.invalid/sec bookworm-security main\n";
        let l = parse_list(list);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].uri, "http://m.invalid/debian");
        let d = "Types: deb\nURIs: http://a.invalid/d\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                 Types: deb\nURIs: http://b.invalid/s\nSuites: bookworm-security\n";
        let s = parse_deb822(d);
        assert_eq!(s.len(), 2);
        assert_eq!(
            pick_mirror(&s, "bookworm").as_deref(),
            Some("http://a.invalid/d")
        );
        assert_eq!(
            pick_mirror(&s, "trixie").as_deref(),
            Some("http://a.invalid/d")
        );
        assert_eq!(pick_mirror(&[], "bookworm"), None);
    }
}
