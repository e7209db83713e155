//! Certificates for tests (feature `test-certs`): a CA made on the spot, and server and
//! client certificates it signs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::TlsFiles;

/// A certificate authority that exists only for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate in DER, to compare with what a peer presents.
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a key");
        let cert = params.self_signed(&key).expect("self-signed");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `names` (DNS names or IP addresses) with `common_name` as its
    /// subject, signed by this CA.
    pub fn issue(&self, common_name: &str, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("valid names");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `ca.pem` into `dir`; returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("writing the CA");
        path
    }
}

impl Issued {
    /// Writes `<stem>.pem` and `<stem>.key` into `dir`, replacing what is there the way
    /// cert-manager does (a new file renamed over the old one).
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        for (path, content) in [(&cert, &self.cert_pem), (&key, &self.key_pem)] {
            let temp = path.with_extension("new");
            std::fs::write(&temp, content).expect("writing a certificate file");
            std::fs::rename(&temp, path).expect("renaming it into place");
        }
        (cert, key)
    }

    /// Server files for this certificate under `dir`, without client authentication.
    pub fn server_files(&self, dir: &Path) -> TlsFiles {
        let (cert, key) = self.write(dir, "server");
        TlsFiles {
            cert,
            key,
            client_ca: None,
        }
    }
}

/// A server with mutual TLS: a CA for its certificate, a CA for its clients', and the
/// files that serve them.
pub struct MutualTls {
    pub server_ca: TestCa,
    pub client_ca: TestCa,
    pub files: TlsFiles,
}

impl MutualTls {
    /// Two fresh CAs, and files under `dir` for a server certificate naming `names`.
    pub fn new(dir: &Path, names: &[&str]) -> Self {
        let server_ca = TestCa::new("server CA");
        let client_ca = TestCa::new("client CA");
        let files = TlsFiles {
            client_ca: Some(client_ca.write(dir)),
            ..server_ca.issue("kiln", names).server_files(dir)
        };
        MutualTls {
            server_ca,
            client_ca,
            files,
        }
    }
}
