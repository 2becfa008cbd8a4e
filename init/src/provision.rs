//! Provisioning, Ignition-style: a TOML config that says what this machine is (hostname,
//! network, fleet metadata, units to install). Applied once, on first boot, and recorded in
//! `/var`; every later boot renders `/etc` from that record. Pure: parsing, validation and
//! rendering; [`crate::boot`] reads the sources and writes the files.
//!
//! ```toml
//! hostname = "node1"
//! [network]              # eth0; loopback is always up
//! address = "10.0.2.15/24"
//! gateway = "10.0.2.2"
//! [metadata]             # for fleet placement
//! role = "web"
//! [fleet]                # fleetd: the cluster's etcd (without it, the embedded registry)
//! etcd = ["http://10.0.2.2:2379"]
//! ttl = 5                # presence lease, seconds (default 5)
//! address = "10.0.2.15"  # shown by list-machines (default: [network] address)
//! listen = "0.0.0.0:4002" # fleetd's TCP API, which the other fleetds relay to
//! ca = """-----BEGIN CERTIFICATE-----..."""   # mutual TLS (with listen): the cluster CA,
//! cert = """-----BEGIN CERTIFICATE-----...""" # this machine's certificate (OU=machine)
//! key = """-----BEGIN PRIVATE KEY-----..."""  # and its key (-> 0600); also for https etcd
//! # token = "s3cret"     # instead of ca/cert/key: plaintext with a shared token (insecure)
//! [registries]           # -> /etc/flotilla/registries.toml (0600), the same format
//! default_registry = "registry.example:5000"
//! [registries.registry."registry.example:5000"]
//! username = "ci"
//! password = "s3cret"
//! ca = """-----BEGIN CERTIFICATE-----..."""   # its CA, inline (instead of ca_file)
//!                        # -> /etc/flotilla/registry-ca-registry.example_5000.crt
//! [os]                   # -> /etc/flotilla/os.toml: an updated slot on trial is
//! commit_after = "30s"   # committed once every unit is healthy this long (default 30s),
//! commit_deadline = "5m" # else the init reboots this long after the boot (default 5m)
//! [[units]]              # installed into /etc/flotilla/units
//! name = "hello.toml"
//! contents = """
//! [container]
//! command = ["/bin/echo", "hello"]
//! """
//! ```
//!
//! A config is valid as a whole or not at all: every unit is parsed with the unit format's
//! own validation, and an error names the config, line and column (for a unit's error, the
//! line inside the config where the unit's text sits).

// Errors are the unit format's `UnitError` (a plain struct, as in the units crate); they
// are rare, so the size of `Result<_, UnitError>` does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use flotilla_units::{parse_unit, split_instance, Template, UnitError};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A provisioning config that parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// The machine's hostname; `None` keeps the kernel's default.
    pub hostname: Option<String>,
    /// A static IPv4 address on eth0.
    pub network: Option<Network>,
    /// Free-form key/value pairs for fleet's `machine_metadata`.
    pub metadata: BTreeMap<String, String>,
    /// Unit files to install, by file name (`web.toml`, `worker@.toml`).
    pub units: Vec<(String, String)>,
    /// `[fleet]`: how this machine's fleetd joins its cluster.
    pub fleet: Fleet,
    /// `[registries]`: the registry settings, rendered as [`REGISTRIES`] (0600).
    pub registries: Option<Registries>,
    /// `[os]`: how an updated slot is judged, rendered as [`OS_SETTINGS`].
    pub os: OsSettings,
}

/// `[os]`: when the init commits a slot on trial ([`crate::trial`]), as duration strings
/// (`"30s"`, `"5m"`), checked here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OsSettings {
    /// Every unit healthy this long commits the slot (default 30s).
    pub commit_after: Option<String>,
    /// No commit this long after the boot reboots (default 5m).
    pub commit_deadline: Option<String>,
}

/// Where [`render`] puts `[os]` (read by PID 1 when the booted slot is on trial).
pub const OS_SETTINGS: &str = crate::trial::SETTINGS;

/// `[registries]`: `registries.toml`'s format (see registry/README.md), checked for its
/// keys and types here and rendered as it is; `unitctl image pull` applies the rest.
#[derive(Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Registry that short names resolve against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_registry: Option<String>,
    /// Per-registry settings, keyed by `host` or `host:port`.
    #[serde(default)]
    pub registry: BTreeMap<String, Registry>,
}

/// One `[registries.registry."host:port"]`.
#[derive(Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// User name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password, inline (never shown in debug output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// File holding the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// PEM file of an extra CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// An extra CA, inline (PEM): provisioning's own key, rendered to
    /// [`registry_ca_path`] and named by `ca_file` in `registries.toml`.
    #[serde(skip_serializing)]
    pub ca: Option<String>,
    /// Plain HTTP is allowed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Mirrors, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

// Credentials never reach a log through `{:?}`.
impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("default_registry", &self.default_registry)
            .field("registry", &self.registry.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// `[fleet]`: fleetd's settings, rendered as `/etc/flotilla/fleetd.toml` (fleetd's flags
/// override them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fleet {
    /// etcd client URLs; empty: the embedded registry (a cluster of one).
    pub etcd: Vec<String>,
    /// The presence lease TTL in seconds; `None`: fleetd's default.
    pub ttl: Option<u64>,
    /// The address other machines and `list-machines` show; `None`: the `[network]`
    /// address, if any.
    pub address: Option<String>,
    /// fleetd's TCP API (`HOST:PORT`), for fleetctl from afar and for the other fleetds.
    pub listen: Option<String>,
    /// The cluster's shared API token (rendered as `/etc/flotilla/fleetd.token`, 0600):
    /// fleetd's plaintext mode (`insecure = true`).
    pub token: Option<String>,
    /// Mutual TLS for the TCP API, the journal relay and `https://` etcd endpoints.
    pub tls: Option<FleetTls>,
}

/// `[fleet] ca`, `cert`, `key`: inline PEM, rendered as [`FLEETD_CA`], [`FLEETD_CERT`] and
/// [`FLEETD_KEY`] (0600).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTls {
    /// The cluster CA's certificate.
    pub ca: String,
    /// This machine's certificate (`OU=machine`, subjectAltName = its address).
    pub cert: String,
    /// Its private key.
    pub key: String,
}

/// `[network]`: a static IPv4 configuration of eth0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The address.
    pub address: Ipv4Addr,
    /// The prefix length (`/24`).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl Network {
    /// The netmask of [`Network::prefix`].
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    hostname: Option<Spanned<String>>,
    network: Option<RawNetwork>,
    #[serde(default)]
    metadata: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    units: Vec<RawUnit>,
    fleet: Option<RawFleet>,
    registries: Option<Registries>,
    os: Option<RawOs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOs {
    commit_after: Option<Spanned<String>>,
    commit_deadline: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    #[serde(default)]
    etcd: Vec<Spanned<String>>,
    ttl: Option<Spanned<i64>>,
    address: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    address: Spanned<String>,
    gateway: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    name: Spanned<String>,
    contents: Spanned<String>,
}

/// The help line every syntax error carries.
const FORMAT_HELP: &str = "the provisioning format is documented in init/README.md \
     (keys: hostname, [network] address gateway, [metadata], [[units]] name contents, \
     [fleet] etcd ttl address listen token ca cert key, [registries] as registries.toml, \
     [os] commit_after commit_deadline)";

/// Parses and validates a provisioning config. `label` names it in errors (a path, or
/// `fw_cfg:opt/org.flotilla/config`).
pub fn parse(label: &str, text: &str) -> Result<Config, UnitError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let err = UnitError::new(label, e.message().to_string()).with_help(FORMAT_HELP);
        match e.span() {
            Some(span) => err.at_offset(text, span.start),
            None => err,
        }
    })?;
    let at = |span: std::ops::Range<usize>, msg: String, help: &str| {
        UnitError::new(label, msg)
            .with_help(help)
            .at_offset(text, span.start)
    };

    let hostname = match raw.hostname {
        Some(h) => {
            check_hostname(h.get_ref()).map_err(|why| {
                at(
                    h.span(),
                    format!("invalid hostname {:?}: {why}", h.get_ref()),
                    "use 1 to 64 characters: labels of letters, digits and `-`, separated by `.`",
                )
            })?;
            Some(h.into_inner())
        }
        None => None,
    };

    let network = match raw.network {
        Some(n) => {
            let (address, prefix) = parse_cidr(n.address.get_ref()).ok_or_else(|| {
                at(
                    n.address.span(),
                    format!("invalid address {:?}", n.address.get_ref()),
                    "write an IPv4 address with its prefix length, e.g. \"10.0.2.15/24\"",
                )
            })?;
            let gateway = match n.gateway {
                Some(g) => Some(g.get_ref().parse::<Ipv4Addr>().map_err(|_| {
                    at(
                        g.span(),
                        format!("invalid gateway {:?}", g.get_ref()),
                        "write an IPv4 address, e.g. \"10.0.2.2\"",
                    )
                })?),
                None => None,
            };
            Some(Network {
                address,
                prefix,
                gateway,
            })
        }
        None => None,
    };

    let mut metadata = BTreeMap::new();
    for (k, v) in raw.metadata {
        let key_ok = !k.get_ref().is_empty()
            && k.get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !key_ok {
            return Err(at(
                k.span(),
                format!("invalid metadata key {:?}", k.get_ref()),
                "use letters, digits, `-`, `_` and `.`",
            ));
        }
        metadata.insert(k.into_inner(), v);
    }

    let mut units: Vec<(String, String)> = Vec::new();
    for u in raw.units {
        let name = u.name.get_ref();
        let Some(stem) = name.strip_suffix(".toml") else {
            return Err(at(
                u.name.span(),
                format!("unit file name {name:?} does not end in .toml"),
                "name it like a file in /etc/flotilla/units, e.g. \"web.toml\" or \"worker@.toml\"",
            ));
        };
        if units.iter().any(|(n, _)| n == name) {
            return Err(at(
                u.name.span(),
                format!("unit {name:?} is listed twice"),
                "keep one [[units]] entry per file",
            ));
        }
        check_unit(stem, name, u.contents.get_ref())
            .map_err(|e| relocate(e, label, text, u.contents.span()))?;
        units.push((name.clone(), u.contents.into_inner()));
    }

    let fleet = match raw.fleet {
        Some(f) => {
            let mut etcd = Vec::new();
            for url in f.etcd {
                let u = url.get_ref();
                let host = u
                    .strip_prefix("http://")
                    .or_else(|| u.strip_prefix("https://"))
                    .filter(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
                if host.is_none() {
                    return Err(at(
                        url.span(),
                        format!("invalid etcd endpoint {u:?}"),
                        "write etcd's client URL, e.g. \"http://10.0.2.2:2379\"",
                    ));
                }
                etcd.push(url.into_inner());
            }
            let ttl = match f.ttl {
                Some(t) => Some(
                    u64::try_from(*t.get_ref())
                        .ok()
                        .filter(|t| (1..=3600).contains(t))
                        .ok_or_else(|| {
                            at(
                                t.span(),
                                format!("invalid ttl {}", t.get_ref()),
                                "the lease TTL is 1 to 3600 seconds, e.g. ttl = 5",
                            )
                        })?,
                ),
                None => None,
            };
            let address = match f.address {
                Some(a)
                    if a.get_ref().trim().is_empty()
                        || a.get_ref().contains(char::is_whitespace) =>
                {
                    return Err(at(
                        a.span(),
                        format!("invalid address {:?}", a.get_ref()),
                        "write the address others reach this machine at, e.g. \"10.0.2.15\"",
                    ))
                }
                Some(a) => Some(a.into_inner()),
                None => None,
            };
            let listen = match f.listen {
                Some(l) => {
                    let ok = l
                        .get_ref()
                        .rsplit_once(':')
                        .is_some_and(|(_, port)| port.parse::<u16>().is_ok_and(|p| p > 0));
                    if !ok {
                        return Err(at(
                            l.span(),
                            format!("invalid listen {:?}", l.get_ref()),
                            "write HOST:PORT, e.g. \"0.0.0.0:4002\"",
                        ));
                    }
                    Some(l)
                }
                None => None,
            };
            let token_span = f.token.as_ref().map(Spanned::span).unwrap_or_default();
            let token = match f.token {
                Some(t) if t.get_ref().is_empty() || t.get_ref().contains(char::is_whitespace) => {
                    return Err(at(
                        t.span(),
                        "invalid token: empty or with whitespace".into(),
                        "use one word shared by the cluster's machines, e.g. from `head -c 32 /dev/urandom | base64`",
                    ))
                }
                Some(t) => Some(t.into_inner()),
                None => None,
            };
            let pem = |value: &Spanned<String>, name: &str, kind: &str| {
                if value.get_ref().contains(&format!("-----BEGIN {kind}")) {
                    Ok(())
                } else {
                    Err(at(
                        value.span(),
                        format!("invalid {name}: not a PEM {kind}"),
                        &format!("paste the PEM text between triple quotes: {name} = \"\"\"-----BEGIN {kind}...\"\"\" (see fleetd/README.md, \"Certificates\")"),
                    ))
                }
            };
            let tls = match (f.ca, f.cert, f.key) {
                (None, None, None) => None,
                (Some(ca), Some(cert), Some(key)) => {
                    pem(&ca, "ca", "CERTIFICATE")?;
                    pem(&cert, "cert", "CERTIFICATE")?;
                    pem(&key, "key", "PRIVATE KEY")?;
                    Some(FleetTls {
                        ca: ca.into_inner(),
                        cert: cert.into_inner(),
                        key: key.into_inner(),
                    })
                }
                (ca, cert, key) => {
                    let span = ca
                        .as_ref()
                        .or(cert.as_ref())
                        .or(key.as_ref())
                        .map(Spanned::span)
                        .unwrap_or_default();
                    return Err(at(
                        span,
                        "ca, cert and key go together: mutual TLS needs the cluster CA and this machine's certificate and key".into(),
                        "give all three (inline PEM), or none",
                    ));
                }
            };
            match (&listen, &token, &tls) {
                (Some(l), None, None) => {
                    return Err(at(
                        l.span(),
                        "listen needs mutual TLS (ca, cert, key) or a token: the TCP API requires one".into(),
                        "add ca, cert and key (inline PEM; see fleetd/README.md, \"Certificates\"), or, to serve plaintext, token = \"...\" (the same on every machine of the cluster)",
                    ))
                }
                (_, Some(_), Some(_)) => {
                    return Err(at(
                        token_span.clone(),
                        "token and ca/cert/key exclude each other: with TLS the certificates authenticate".into(),
                        "drop token",
                    ))
                }
                _ => {}
            }
            Fleet {
                etcd,
                ttl,
                address,
                listen: listen.map(Spanned::into_inner),
                token,
                tls,
            }
        }
        None => Fleet::default(),
    };

    if let Some(r) = &raw.registries {
        check_registry_cas(r, text, &at)?;
    }

    let mut os = OsSettings::default();
    if let Some(o) = raw.os {
        let duration = |v: Option<Spanned<String>>, name: &str| match v {
            Some(v) => match flotilla_units::parse_duration(v.get_ref()) {
                Ok(d) if !d.is_zero() => Ok(Some(v.into_inner())),
                _ => Err(at(
                    v.span(),
                    format!("invalid {name} {:?}", v.get_ref()),
                    "write a duration, e.g. \"30s\" or \"5m\"",
                )),
            },
            None => Ok(None),
        };
        os.commit_after = duration(o.commit_after, "commit_after")?;
        os.commit_deadline = duration(o.commit_deadline, "commit_deadline")?;
    }

    Ok(Config {
        hostname,
        network,
        metadata,
        units,
        fleet,
        registries: raw.registries,
        os,
    })
}

/// Where a registry's inline `ca` goes; spans of `ca` and `ca_file`, for errors.
#[derive(Deserialize)]
struct CaSpans {
    registries: Option<CaSpansRegistries>,
}

#[derive(Deserialize)]
struct CaSpansRegistries {
    #[serde(default)]
    registry: BTreeMap<String, CaSpan>,
}

#[derive(Deserialize)]
struct CaSpan {
    ca: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

/// Checks every `[registries.registry."HOST"] ca`: a PEM certificate, not beside `ca_file`,
/// and a file name of its own (two registry names must not map to one file).
fn check_registry_cas(
    registries: &Registries,
    text: &str,
    at: &impl Fn(std::ops::Range<usize>, String, &str) -> UnitError,
) -> Result<(), UnitError> {
    if registries.registry.values().all(|r| r.ca.is_none()) {
        return Ok(());
    }
    // The text parsed as a whole already; this second look only finds positions.
    let spans: CaSpans = toml::from_str(text).unwrap_or(CaSpans { registries: None });
    let span_of = |host: &str, file: bool| {
        spans
            .registries
            .as_ref()
            .and_then(|r| r.registry.get(host))
            .and_then(|s| {
                if file {
                    s.ca_file.as_ref()
                } else {
                    s.ca.as_ref()
                }
            })
            .map(|s| s.span())
            .unwrap_or(0..0)
    };
    let mut files: BTreeMap<String, &str> = BTreeMap::new();
    for (host, r) in &registries.registry {
        let Some(ca) = &r.ca else { continue };
        if r.ca_file.is_some() {
            return Err(at(
                span_of(host, true),
                format!("registry {host:?}: ca and ca_file exclude each other"),
                "keep one: ca (the PEM inline) or ca_file (a path on the machine)",
            ));
        }
        if !ca.contains("-----BEGIN CERTIFICATE-----") {
            return Err(at(
                span_of(host, false),
                format!("registry {host:?}: ca is not a PEM certificate (no -----BEGIN CERTIFICATE----- line)"),
                "paste the CA's certificate file, BEGIN and END lines included",
            ));
        }
        let path = registry_ca_path(host);
        if let Some(other) = files.insert(path.clone(), host) {
            return Err(at(
                span_of(host, false),
                format!("registries {other:?} and {host:?} would both write their ca to {path}"),
                "give one of them its CA with ca_file",
            ));
        }
    }
    Ok(())
}

/// The file a registry's inline `ca` is rendered to: `/etc/flotilla/registry-ca-HOST.crt`,
/// every character of `host` other than `A-Z a-z 0-9 . -` made `_`
/// (`10.0.2.2:5000` -> `/etc/flotilla/registry-ca-10.0.2.2_5000.crt`).
pub fn registry_ca_path(host: &str) -> String {
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("/etc/flotilla/registry-ca-{name}.crt")
}

/// Validates one unit's text with the unit format's own parser.
fn check_unit(stem: &str, file: &str, contents: &str) -> Result<(), UnitError> {
    match split_instance(stem) {
        Some((prefix, "")) => Template::new(prefix, None, contents.to_string())
            .map(|_| ())
            .map_err(|e| UnitError {
                file: file.into(),
                ..e
            }),
        _ => parse_unit(stem, None, contents)
            .map(|_| ())
            .map_err(|e| UnitError {
                file: file.into(),
                ..e
            }),
    }
}

/// Moves a unit's error into the config's coordinates: `label:LINE:COL: units/NAME: ...`,
/// where LINE is the config's line that holds the unit's offending line.
fn relocate(e: UnitError, label: &str, text: &str, contents: std::ops::Range<usize>) -> UnitError {
    let raw = text.get(contents.clone()).unwrap_or_default();
    // Where the string's first character sits: after the opening delimiter, and after the
    // newline a multi-line string trims.
    let delim = ["\"\"\"", "'''", "\"", "'"]
        .into_iter()
        .find(|d| raw.starts_with(d))
        .map_or(0, str::len);
    let mut first = contents.start + delim;
    if delim == 3 {
        if text.get(first..first + 1) == Some("\n") {
            first += 1;
        } else if text.get(first..first + 2) == Some("\r\n") {
            first += 2;
        }
    }
    let start = UnitError::new(label, "").at_offset(text, first);
    let (base_line, base_col) = (start.line.unwrap_or(1), start.column.unwrap_or(1));
    let line = e.line.map(|l| base_line + l - 1);
    let column = match (e.line, e.column) {
        (Some(1), Some(c)) => Some(base_col + c - 1),
        (_, c) => c,
    };
    UnitError {
        file: label.to_string(),
        line,
        column,
        message: format!("units/{}: {}", e.file, e.message),
        ..e
    }
}

/// A hostname as sethostname(2) and DNS accept: at most 64 bytes, labels of 1 to 63
/// letters, digits and `-`, not starting or ending with `-`.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{} bytes (1 to 64 allowed)", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("a label is empty or longer than 63 characters".into());
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("the character {c:?} is not allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label must not start or end with `-`".into());
        }
    }
    Ok(())
}

/// `10.0.2.15/24` → (address, 24).
fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let prefix: u8 = len.parse().ok()?;
    (prefix <= 32).then_some(())?;
    Some((addr.parse().ok()?, prefix))
}

/// One file of the rendered `/etc`, relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcFile {
    /// Path below `/etc`, e.g. `flotilla/units/web.toml`.
    pub path: String,
    /// Contents.
    pub contents: String,
    /// Permission bits.
    pub mode: u32,
}

/// The files of `/etc` that come from the config and the machine id (on top of the image's
/// factory `/etc`): `hostname`, `hosts`, `machine-id`, `flotilla/metadata.toml`,
/// `flotilla/fleetd.toml` and the units.
pub fn render(config: &Config, machine_id: &str) -> Vec<EtcFile> {
    let file = |path: &str, contents: String| EtcFile {
        path: path.to_string(),
        contents,
        mode: 0o644,
    };
    let hostname = config.hostname.as_deref().unwrap_or("flotilla");
    let mut files = vec![
        file("hostname", format!("{hostname}\n")),
        file(
            "hosts",
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n"),
        ),
        file("machine-id", format!("{machine_id}\n")),
    ];
    let mut meta = String::from("# fleet machine metadata, from provisioning\n");
    for (k, v) in &config.metadata {
        meta.push_str(&format!("{k} = {}\n", toml_string(v)));
    }
    files.push(file("flotilla/metadata.toml", meta));
    let mut fleetd = String::from("# fleetd's settings, from provisioning ([fleet])\n");
    if !config.fleet.etcd.is_empty() {
        let urls: Vec<String> = config.fleet.etcd.iter().map(|u| toml_string(u)).collect();
        fleetd.push_str(&format!("etcd = [{}]\n", urls.join(", ")));
    }
    if let Some(ttl) = config.fleet.ttl {
        fleetd.push_str(&format!("ttl = {ttl}\n"));
    }
    let address = config
        .fleet
        .address
        .clone()
        .or_else(|| config.network.map(|n| n.address.to_string()));
    if let Some(address) = address {
        fleetd.push_str(&format!("address = {}\n", toml_string(&address)));
    }
    if let Some(listen) = &config.fleet.listen {
        fleetd.push_str(&format!("listen = {}\n", toml_string(listen)));
    }
    if let Some(tls) = &config.fleet.tls {
        for (setting, path) in [
            ("tls_ca", FLEETD_CA),
            ("tls_cert", FLEETD_CERT),
            ("tls_key", FLEETD_KEY),
        ] {
            fleetd.push_str(&format!("{setting} = {}\n", toml_string(path)));
        }
        if config.fleet.etcd.iter().any(|u| u.starts_with("https://")) {
            // The machine certificate is also fleetd's etcd client certificate.
            for (setting, path) in [
                ("etcd_ca", FLEETD_CA),
                ("etcd_cert", FLEETD_CERT),
                ("etcd_key", FLEETD_KEY),
            ] {
                fleetd.push_str(&format!("{setting} = {}\n", toml_string(path)));
            }
        }
        let name = |path: &str| path.trim_start_matches("/etc/").to_string();
        files.push(file(&name(FLEETD_CA), tls.ca.clone()));
        files.push(file(&name(FLEETD_CERT), tls.cert.clone()));
        files.push(EtcFile {
            mode: 0o600,
            ..file(&name(FLEETD_KEY), tls.key.clone())
        });
    }
    if let Some(token) = &config.fleet.token {
        // The shared token is fleetd's plaintext mode, which it serves only when told so.
        fleetd.push_str("insecure = true\n");
        fleetd.push_str(&format!("token_file = {}\n", toml_string(FLEETD_TOKEN)));
        files.push(EtcFile {
            mode: 0o600,
            ..file("flotilla/fleetd.token", format!("{token}\n"))
        });
    }
    files.push(file("flotilla/fleetd.toml", fleetd));
    for (name, contents) in &config.units {
        files.push(file(&format!("flotilla/units/{name}"), contents.clone()));
    }
    if let Some(r) = &config.registries {
        // An inline CA becomes a file beside registries.toml (a CA is public: 0644), which
        // the rendered settings name as its `ca_file`.
        let mut r = r.clone();
        for (host, reg) in &mut r.registry {
            if let Some(ca) = reg.ca.take() {
                let path = registry_ca_path(host);
                files.push(file(path.trim_start_matches("/etc/"), ca));
                reg.ca_file = Some(path);
            }
        }
        // Serializing plain strings, bools and tables cannot fail; were it to, the file
        // says so instead of holding half the settings.
        let body = toml::to_string(&r)
            .unwrap_or_else(|e| format!("# could not render [registries]: {e}\n"));
        files.push(EtcFile {
            mode: 0o600,
            ..file(
                REGISTRIES.trim_start_matches("/etc/"),
                format!("# registry settings, from provisioning ([registries])\n{body}"),
            )
        });
    }
    if config.os != OsSettings::default() {
        let mut body = String::from("# the host's A/B update, from provisioning ([os])\n");
        for (key, value) in [
            ("commit_after", &config.os.commit_after),
            ("commit_deadline", &config.os.commit_deadline),
        ] {
            if let Some(v) = value {
                body.push_str(&format!("{key} = {}\n", toml_string(v)));
            }
        }
        files.push(file(OS_SETTINGS.trim_start_matches("/etc/"), body));
    }
    files
}

/// Where [`render`] puts `[registries]`, mode 0600 (credentials): `unitctl image pull`'s
/// default settings file.
pub const REGISTRIES: &str = "/etc/flotilla/registries.toml";

/// Where [`render`] puts `[fleet] token` (for fleetd's `token_file`).
pub const FLEETD_TOKEN: &str = "/etc/flotilla/fleetd.token";
/// Where [`render`] puts `[fleet] ca` (for fleetd's `tls_ca`, `etcd_ca`).
pub const FLEETD_CA: &str = "/etc/flotilla/fleet-ca.crt";
/// Where [`render`] puts `[fleet] cert` (for fleetd's `tls_cert`, `etcd_cert`).
pub const FLEETD_CERT: &str = "/etc/flotilla/fleetd.crt";
/// Where [`render`] puts `[fleet] key`, mode 0600 (for fleetd's `tls_key`, `etcd_key`).
pub const FLEETD_KEY: &str = "/etc/flotilla/fleetd.key";

/// A TOML basic string.
fn toml_string(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    const GOOD: &str = r#"hostname = "node1"
[network]
address = "10.0.2.15/24"
gateway = "10.0.2.2"
[metadata]
role = "web"
disk = "ssd"
[[units]]
name = "hello.toml"
contents = """
[container]
command = ["/bin/echo", "hello"]
"""
[[units]]
name = "worker@.toml"
contents = '''
[container]
command = ["/bin/echo", "%i"]
'''
"#;

    #[test]
    fn parses_a_full_config() {
        let c = parse("cfg", GOOD).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("node1"));
        let n = c.network.unwrap();
        assert_eq!(n.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(n.prefix, 24);
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(c.metadata["role"], "web");
        assert_eq!(c.units.len(), 2);
        assert_eq!(c.units[1].0, "worker@.toml");
    }

    /// `[fleet]` becomes /etc/flotilla/fleetd.toml; the address defaults to eth0's.
    #[test]
    fn fleet_settings_render_fleetd_toml() {
        let text = format!(
            "{GOOD}[fleet]\netcd = [\"http://10.0.2.2:2379\", \"https://e2:2379\"]\nttl = 3\n"
        );
        // The rendered /etc/flotilla/fleetd.toml, parsed.
        let fleetd_toml = |c: &Config| -> toml::Table {
            let files = render(c, "id");
            let file = files.iter().find(|f| f.path == "flotilla/fleetd.toml");
            toml::from_str(&file.unwrap().contents).unwrap()
        };
        let c = parse("cfg", &text).unwrap();
        assert_eq!(c.fleet.etcd, ["http://10.0.2.2:2379", "https://e2:2379"]);
        assert_eq!(c.fleet.ttl, Some(3));
        let table = fleetd_toml(&c);
        assert_eq!(table["etcd"].as_array().unwrap().len(), 2, "{table}");
        assert_eq!(table["ttl"].as_integer(), Some(3));
        assert_eq!(table["address"].as_str(), Some("10.0.2.15"));
        let c = parse("cfg", "[fleet]\naddress = \"node1.example\"\n").unwrap();
        let table = fleetd_toml(&c);
        assert_eq!(table.get("etcd"), None);
        assert_eq!(table["address"].as_str(), Some("node1.example"));
        assert_eq!(table.get("listen"), None);
        // The TCP API and the cluster's token: the token in a file of its own, 0600.
        let c = parse(
            "cfg",
            "[fleet]\nlisten = \"0.0.0.0:4002\"\ntoken = \"s3cret\"\n",
        )
        .unwrap();
        let table = fleetd_toml(&c);
        assert_eq!(table["listen"].as_str(), Some("0.0.0.0:4002"));
        assert_eq!(table["token_file"].as_str(), Some(FLEETD_TOKEN));
        assert_eq!(table["insecure"].as_bool(), Some(true));
        let files = render(&c, "id");
        let token = files
            .iter()
            .find(|f| f.path == "flotilla/fleetd.token")
            .unwrap();
        assert_eq!((token.contents.as_str(), token.mode), ("s3cret\n", 0o600));
        assert!(files
            .iter()
            .filter(|f| f.path != "flotilla/fleetd.token")
            .all(|f| f.mode == 0o644));
    }

    /// `[fleet] ca/cert/key` become files (the key 0600) and fleetd's TLS settings; etcd's
    /// too when an endpoint is https. Half of them, a token as well, or no PEM is refused.
    #[test]
    fn fleet_tls_renders_files_and_settings() {
        let pem = "ca = \"\"\"\n-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n\"\"\"\n\
                   cert = \"\"\"\n-----BEGIN CERTIFICATE-----\nME\n-----END CERTIFICATE-----\n\"\"\"\n\
                   key = \"\"\"\n-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n\"\"\"\n";
        let text = format!(
            "[fleet]\netcd = [\"https://10.0.2.2:2379\"]\nlisten = \"0.0.0.0:4002\"\n{pem}"
        );
        let c = parse("cfg", &text).unwrap();
        let files = render(&c, "id");
        let get = |path: &str| files.iter().find(|f| f.path == path).unwrap();
        let table: toml::Table = toml::from_str(&get("flotilla/fleetd.toml").contents).unwrap();
        for (setting, path) in [
            ("tls_ca", FLEETD_CA),
            ("tls_cert", FLEETD_CERT),
            ("tls_key", FLEETD_KEY),
            ("etcd_ca", FLEETD_CA),
            ("etcd_cert", FLEETD_CERT),
            ("etcd_key", FLEETD_KEY),
        ] {
            assert_eq!(table[setting].as_str(), Some(path), "{table}");
        }
        assert_eq!(table.get("insecure"), None);
        assert_eq!(table.get("token_file"), None);
        let key = get("flotilla/fleetd.key");
        assert_eq!(key.mode, 0o600);
        assert!(key.contents.contains("BEGIN PRIVATE KEY"));
        assert_eq!(get("flotilla/fleet-ca.crt").mode, 0o644);
        assert!(get("flotilla/fleetd.crt").contents.contains("ME"));
        // Plain etcd: no etcd TLS settings.
        let c = parse("cfg", &format!("[fleet]\nlisten = \"0.0.0.0:4002\"\n{pem}")).unwrap();
        let files = render(&c, "id");
        let fleetd = files
            .iter()
            .find(|f| f.path == "flotilla/fleetd.toml")
            .unwrap();
        assert!(!fleetd.contents.contains("etcd_ca"), "{}", fleetd.contents);

        for (bad, says) in [
            (
                "[fleet]\nlisten = \"0.0.0.0:4002\"\n".to_string(),
                "listen needs mutual TLS (ca, cert, key) or a token",
            ),
            (
                "[fleet]\nca = \"-----BEGIN CERTIFICATE-----\"\n".to_string(),
                "ca, cert and key go together",
            ),
            (
                format!("[fleet]\ntoken = \"t\"\n{pem}"),
                "token and ca/cert/key exclude each other",
            ),
            (
                format!(
                    "[fleet]\n{}",
                    pem.replace("BEGIN PRIVATE KEY", "BEGIN NOTHING")
                ),
                "invalid key: not a PEM PRIVATE KEY",
            ),
        ] {
            let err = parse("cfg", &bad).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("cfg:"), "{bad}: {err}");
        }
    }

    #[test]
    fn empty_config_is_valid() {
        assert_eq!(parse("cfg", "").unwrap(), Config::default());
    }

    #[test]
    fn netmask_edges() {
        let n = |prefix| Network {
            address: Ipv4Addr::UNSPECIFIED,
            prefix,
            gateway: None,
        };
        assert_eq!(n(0).netmask(), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(n(32).netmask(), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(n(20).netmask(), Ipv4Addr::new(255, 255, 240, 0));
    }

    /// Every error names the config with line and column.
    #[test]
    fn errors_are_located() {
        let cases: &[(&str, &str, &str)] = &[
            ("hostnme = \"x\"\n", "cfg:1:1:", "unknown field"),
            ("hostname = \"bad_name\"\n", "cfg:1:12:", "invalid hostname"),
            (
                "[network]\naddress = \"10.0.2.15\"\n",
                "cfg:2:11:",
                "invalid address",
            ),
            (
                "[network]\naddress = \"10.0.2.15/24\"\ngateway = \"x\"\n",
                "cfg:3:11:",
                "invalid gateway",
            ),
            ("[metadata]\n\"a b\" = \"c\"\n", "cfg:2:1:", "invalid metadata key"),
            (
                "[fleet]\netcd = [\"http://a:1\", \"10.0.0.1:2379\"]\n",
                "cfg:2:23:",
                "invalid etcd endpoint",
            ),
            ("[fleet]\nttl = 0\n", "cfg:2:7:", "invalid ttl"),
            ("[fleet]\nlisten = \"0.0.0.0\"\n", "cfg:2:10:", "invalid listen"),
            (
                "[fleet]\nlisten = \"0.0.0.0:4002\"\n",
                "cfg:2:10:",
                "listen needs mutual TLS (ca, cert, key) or a token",
            ),
            ("[fleet]\ntoken = \"a b\"\n", "cfg:2:9:", "invalid token"),
            ("[fleet]\naddress = \"\"\n", "cfg:2:11:", "invalid address"),
            ("[fleet]\netcd = \"http://a:1\"\n", "cfg:2:8:", "invalid type"),
            (
                "[[units]]\nname = \"web\"\ncontents = \"\"\n",
                "cfg:2:8:",
                "does not end in .toml",
            ),
            // The unit's own error, moved to the config's line 5 (the unit's line 2).
            (
                "[[units]]\nname = \"web.toml\"\ncontents = \"\"\"\n[container]\ncommand = []\n\"\"\"\n",
                "cfg:5:11:",
                "units/web.toml:",
            ),
        ];
        for (text, at, what) in cases {
            let e = parse("cfg", text).unwrap_err().to_string();
            assert!(e.starts_with(at), "{text:?}: {e}");
            assert!(e.contains(what), "{text:?}: {e}");
            assert!(e.contains("help:"), "{text:?}: {e}");
        }
    }

    #[test]
    fn duplicate_units_are_refused() {
        let t = "[[units]]\nname = \"a.toml\"\ncontents = \"[container]\\ncommand = ['x']\"\n\
                 [[units]]\nname = \"a.toml\"\ncontents = \"\"\n";
        let e = parse("cfg", t).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn hostnames() {
        for ok in ["a", "node-1", "a.b.c", &"x".repeat(63)] {
            assert!(check_hostname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", &"x".repeat(65), "ü"] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_etc_files() {
        let c = parse("cfg", GOOD).unwrap();
        let files = render(&c, "0123456789abcdef0123456789abcdef");
        let get = |p: &str| {
            files
                .iter()
                .find(|f| f.path == p)
                .map(|f| f.contents.clone())
                .unwrap()
        };
        assert_eq!(get("hostname"), "node1\n");
        assert!(get("hosts").contains("127.0.1.1\tnode1"));
        assert_eq!(get("machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert!(get("flotilla/metadata.toml").contains("disk = \"ssd\"\nrole = \"web\"\n"));
        assert!(get("flotilla/units/hello.toml").contains("/bin/echo"));
        assert!(get("flotilla/units/worker@.toml").contains("%i"));
        assert!(!files.iter().any(|f| f.path == "flotilla/registries.toml"));
    }

    #[test]
    fn os_settings_render_as_os_toml_and_bad_durations_are_refused() {
        let c = parse(
            "p",
            "[os]\ncommit_after = \"5s\"\ncommit_deadline = \"2m\"\n",
        )
        .unwrap();
        let files = render(&c, "0123");
        let f = files.iter().find(|f| f.path == "flotilla/os.toml").unwrap();
        assert!(f
            .contents
            .contains("commit_after = \"5s\"\ncommit_deadline = \"2m\"\n"));
        // What PID 1 reads back.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("os.toml");
        std::fs::write(&path, &f.contents).unwrap();
        let p = crate::trial::TrialPolicy::load(&path).unwrap();
        assert_eq!(p.commit_after, std::time::Duration::from_secs(5));
        assert_eq!(p.commit_deadline, std::time::Duration::from_secs(120));
        // Without [os], no file: the defaults.
        let plain = render(&parse("p", "").unwrap(), "0123");
        assert!(!plain.iter().any(|f| f.path == "flotilla/os.toml"));
        let e = parse("p", "[os]\ncommit_after = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid commit_after") && e.contains(":2:"),
            "{e}"
        );
        let e = parse("p", "[os]\ncommit_after = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid commit_after"), "{e}");
        assert!(parse("p", "[os]\ncommit = \"1s\"\n").is_err());
    }

    #[test]
    fn registries_render_as_registries_toml_0600() {
        let text = "hostname = \"node1\"\n\
                    [registries]\n\
                    default_registry = \"registry.example:5000\"\n\
                    [registries.registry.\"registry.example:5000\"]\n\
                    username = \"ci\"\n\
                    password = \"hunter2\"\n\
                    mirrors = [\"mirror.local:5000\"]\n\
                    [registries.registry.\"127.0.0.1:5000\"]\n\
                    insecure = true\n";
        let c = parse("cfg", text).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        let files = render(&c, "0123456789abcdef0123456789abcdef");
        let f = files
            .iter()
            .find(|f| f.path == "flotilla/registries.toml")
            .unwrap();
        assert_eq!(f.mode, 0o600);
        // What the pull helper reads: the same settings, in registries.toml's own format.
        let back: toml::Table = toml::from_str(&f.contents).unwrap();
        let want: toml::Table = toml::from_str(
            "default_registry = \"registry.example:5000\"\n\
             [registry.\"registry.example:5000\"]\n\
             username = \"ci\"\npassword = \"hunter2\"\nmirrors = [\"mirror.local:5000\"]\n\
             [registry.\"127.0.0.1:5000\"]\ninsecure = true\n",
        )
        .unwrap();
        assert_eq!(back, want, "{}", f.contents);

        // A key registries.toml does not know is refused here, at its line.
        let bad = "[registries.registry.\"r:5000\"]\ninsecure = true\nmirrorz = []\n";
        let e = parse("cfg", bad).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().contains("mirrorz"), "{e}");
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn an_inline_registry_ca_renders_beside_registries_toml_as_its_ca_file() {
        let text = format!(
            "[registries.registry.\"10.0.2.2:5000\"]\n\
             username = \"ci\"\npassword = \"hunter2\"\nca = \"\"\"\n{PEM}\"\"\"\n\
             [registries.registry.\"other.example\"]\ninsecure = true\n"
        );
        let c = parse("cfg", &text).unwrap();
        let files = render(&c, "0123456789abcdef0123456789abcdef");
        assert_eq!(
            registry_ca_path("10.0.2.2:5000"),
            "/etc/flotilla/registry-ca-10.0.2.2_5000.crt"
        );
        let ca = files
            .iter()
            .find(|f| f.path == "flotilla/registry-ca-10.0.2.2_5000.crt")
            .unwrap();
        assert_eq!(ca.contents, PEM);
        assert_eq!(ca.mode, 0o644);
        let reg = files
            .iter()
            .find(|f| f.path == "flotilla/registries.toml")
            .unwrap();
        assert_eq!(reg.mode, 0o600);
        // registries.toml names the file; the PEM and the `ca` key are not in it (the pull
        // helper's format has no `ca`).
        let back: toml::Table = toml::from_str(&reg.contents).unwrap();
        let want: toml::Table = toml::from_str(
            "[registry.\"10.0.2.2:5000\"]\n\
             username = \"ci\"\npassword = \"hunter2\"\n\
             ca_file = \"/etc/flotilla/registry-ca-10.0.2.2_5000.crt\"\n\
             [registry.\"other.example\"]\ninsecure = true\n",
        )
        .unwrap();
        assert_eq!(back, want, "{}", reg.contents);
        // Only the one registry with a `ca` got a file.
        assert_eq!(
            files
                .iter()
                .filter(|f| f.path.starts_with("flotilla/registry-ca-"))
                .count(),
            1
        );
        // A host name cannot leave /etc/flotilla.
        assert_eq!(
            registry_ca_path("../../x/y:1"),
            "/etc/flotilla/registry-ca-.._.._x_y_1.crt"
        );
    }

    #[test]
    fn a_bad_inline_registry_ca_is_refused_at_its_line() {
        // Not a PEM certificate.
        let text = "hostname = \"n\"\n[registries.registry.\"r:5000\"]\nca = \"secret\"\n";
        let e = parse("cfg", text).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().contains("not a PEM certificate"), "{e}");

        // ca and ca_file together.
        let text = format!(
            "[registries.registry.\"r:5000\"]\nca = \"\"\"\n{PEM}\"\"\"\n\
             ca_file = \"/etc/x.crt\"\n"
        );
        let e = parse("cfg", &text).unwrap_err();
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.to_string().contains("exclude each other"), "{e}");

        // Two registry names that map to one file.
        let text = format!(
            "[registries.registry.\"r:5000\"]\nca = \"\"\"\n{PEM}\"\"\"\n\
             [registries.registry.\"r_5000\"]\nca = \"\"\"\n{PEM}\"\"\"\n"
        );
        let e = parse("cfg", &text).unwrap_err();
        assert!(e.to_string().contains("would both write"), "{e}");
    }
}
