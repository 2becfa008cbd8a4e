//! `%` specifiers: `%n %N %p %i %I %%`.

/// The values specifiers expand to for one unit.
#[derive(Debug, Clone)]
pub(crate) struct Specifiers {
    name: String,
    prefix: String,
    instance: Option<String>,
}

impl Specifiers {
    /// Specifiers for the unit called `name` (`prefix@instance` or a plain name).
    pub(crate) fn for_name(name: &str) -> Self {
        match crate::parse::split_instance(name) {
            Some((prefix, instance)) => Self {
                name: name.to_string(),
                prefix: prefix.to_string(),
                instance: Some(instance.to_string()),
            },
            None => Self {
                name: name.to_string(),
                prefix: name.to_string(),
                instance: None,
            },
        }
    }

    /// Expands every specifier in `text`. On error returns (message, help).
    pub(crate) fn expand(&self, text: &str) -> Result<String, (String, String)> {
        if !text.contains('%') {
            return Ok(text.to_string());
        }
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('n') => out.push_str(&self.name),
                Some('N') => out.push_str(&unescape(&self.name)),
                Some('p') => out.push_str(&self.prefix),
                Some(spec @ ('i' | 'I')) => match &self.instance {
                    Some(instance) if spec == 'i' => out.push_str(instance),
                    Some(instance) => out.push_str(&unescape(instance)),
                    None => {
                        return Err((
                            format!(
                                "`%{spec}` needs an instance name, but `{}` is not a template instance",
                                self.name
                            ),
                            format!(
                                "make it a template by naming the file `{}@.toml`, or write `%%` for a literal percent sign",
                                self.name
                            ),
                        ))
                    }
                },
                Some(other) => {
                    return Err((
                        format!("unknown specifier `%{other}` in {text:?}"),
                        "specifiers are %n (unit name), %N (unescaped name), %p (prefix), \
                         %i (instance), %I (unescaped instance); write `%%` for a literal percent sign"
                            .to_string(),
                    ))
                }
                None => {
                    return Err((
                        format!("lone `%` at the end of {text:?}"),
                        "write `%%` for a literal percent sign".to_string(),
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// Undoes `\xNN` escapes (systemd-style); anything else is kept as is.
pub(crate) fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            let hex = bytes
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn expands_instance_specifiers() {
        let s = Specifiers::for_name("worker@a\\x2db");
        assert_eq!(
            s.expand("%n|%N|%p|%i|%I|100%%").unwrap(),
            "worker@a\\x2db|worker@a-b|worker|a\\x2db|a-b|100%"
        );
    }

    #[test]
    fn plain_units_expand_name_only() {
        let s = Specifiers::for_name("web");
        assert_eq!(s.expand("%n %p %%").unwrap(), "web web %");
        let (msg, help) = s.expand("x%i").unwrap_err();
        assert!(msg.contains("`%i` needs an instance"), "{msg}");
        assert!(help.contains("web@.toml"), "{help}");
    }

    #[test]
    fn bad_specifiers() {
        let s = Specifiers::for_name("w@1");
        assert!(s
            .expand("%z")
            .unwrap_err()
            .0
            .contains("unknown specifier `%z`"));
        assert!(s.expand("50%").unwrap_err().0.contains("lone `%`"));
    }

    #[test]
    fn unescape_keeps_invalid_escapes() {
        assert_eq!(unescape("a\\x2fb\\xzz\\"), "a/b\\xzz\\");
    }
}
