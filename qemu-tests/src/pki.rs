//! A cluster CA for tests and demos, issued with the `openssl` CLI exactly as
//! `fleetd/README.md` ("Certificates") tells an operator to: EC P-256 keys, the role in the
//! subject's OU (`operator`, `reader`, `machine`), machines named by their address.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{ensure_program, io_err, QemuError, Result};

/// A certificate and its private key (PEM files).
#[derive(Debug, Clone)]
pub struct Cert {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key (PKCS#8).
    pub key: PathBuf,
}

/// A certificate authority whose files live in one directory.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    openssl: PathBuf,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage<'a> {
    /// A client only (operators and readers).
    Client,
    /// Server and client, valid for this IP address and for loopback (machines, etcd).
    Node(&'a str),
}

impl Ca {
    /// Creates the CA `/O=flotilla/CN={name} CA` (`ca.crt`, `ca.key`) in `dir`; installs
    /// `openssl` if missing.
    pub fn new(dir: &Path, name: &str) -> Result<Ca> {
        let ca = Ca {
            dir: dir.to_path_buf(),
            openssl: ensure_program("openssl", "openssl")?,
        };
        ca.run(&[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-days",
            "3650",
            "-subj",
            &format!("/O=flotilla/CN={name} CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ])?;
        Ok(ca)
    }

    /// The CA's certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issues `name.crt`/`name.key` for `/O=flotilla/OU={role}/CN={name}`.
    pub fn issue(&self, name: &str, role: &str, usage: Usage<'_>) -> Result<Cert> {
        let usage = match usage {
            Usage::Client => "extendedKeyUsage=clientAuth\n".to_string(),
            Usage::Node(ip) => {
                let also = if ip == "127.0.0.1" {
                    ""
                } else {
                    ",IP:127.0.0.1"
                };
                format!(
                    "extendedKeyUsage=serverAuth,clientAuth\n\
                     subjectAltName=IP:{ip}{also},DNS:localhost\n"
                )
            }
        };
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{usage}"),
        )
        .map_err(|e| io_err("write", &ext, e))?;
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        self.run(&[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-subj",
            &format!("/O=flotilla/OU={role}/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ])?;
        self.run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &crt,
        ])?;
        Ok(Cert {
            cert: self.dir.join(crt),
            key: self.dir.join(key),
        })
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(&self.openssl)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io_err("run", &self.openssl, e))?;
        if !out.status.success() {
            return Err(QemuError::Setup(format!(
                "openssl {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// The PEM text of `path`, for provisioning's inline `ca`, `cert` and `key`.
pub fn pem(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))
}
