//! Certificates and client CAs that follow their files.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::TlsError;

/// How often, at most, a handshake looks at the files again.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What the filesystem says of a file's current content: a replaced file, or a swapped
/// symlink (what cert-manager and Kubernetes secret volumes do), changes one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
        inode: metadata.ino(),
    })
}

/// A value loaded from files, loaded again when they change.
type Loader<T> = Box<dyn Fn(&[PathBuf]) -> Result<T, TlsError> + Send + Sync>;

struct Watched<T> {
    paths: Vec<PathBuf>,
    load: Loader<T>,
    state: Mutex<WatchState<T>>,
}

struct WatchState<T> {
    stamps: Vec<Option<FileStamp>>,
    value: Arc<T>,
    checked: Instant,
}

impl<T> Watched<T> {
    fn load(paths: Vec<PathBuf>, load: Loader<T>) -> Result<Self, TlsError> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let value = Arc::new(load(&paths)?);
        Ok(Watched {
            paths,
            load,
            state: Mutex::new(WatchState {
                stamps,
                value,
                checked: Instant::now(),
            }),
        })
    }

    /// The current value, reloaded first if the files changed since the last look (at
    /// most one look per interval). A reload that fails keeps the previous value and is
    /// tried again at the next look.
    fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            state.checked = Instant::now();
            let stamps: Vec<Option<FileStamp>> = self.paths.iter().map(|p| stamp(p)).collect();
            if stamps != state.stamps {
                match (self.load)(&self.paths) {
                    Ok(value) => {
                        state.value = Arc::new(value);
                        state.stamps = stamps;
                        tracing::info!(files = ?self.paths, "reloaded TLS files");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the TLS files changed but do not load; keeping the previous ones")
                    }
                }
            }
        }
        state.value.clone()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            reason: "holds no certificate".into(),
        });
    }
    Ok(certs)
}

fn certified_key(paths: &[PathBuf]) -> Result<CertifiedKey, TlsError> {
    let [cert_path, key_path] = paths else {
        unreachable!("a certificate and its key")
    };
    let certs = certificates(cert_path)?;
    let invalid_key = |reason: String| TlsError::Invalid {
        path: key_path.clone(),
        reason,
    };
    // The key's bytes never go into an error: only what kind of problem it was.
    let key = PrivateKeyDer::from_pem_slice(&read(key_path)?)
        .map_err(|_| invalid_key("not a PEM private key".into()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| invalid_key("an unsupported private key type".into()))?;
    let certified = CertifiedKey::new(certs, signing_key);
    certified
        .keys_match()
        .map_err(|_| invalid_key(format!("does not match {}", cert_path.display())))?;
    Ok(certified)
}

/// The server's certificate and key, following their files.
pub struct ReloadingCertificate(Watched<CertifiedKey>);

impl ReloadingCertificate {
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        Ok(ReloadingCertificate(Watched::load(
            vec![cert, key],
            Box::new(certified_key),
        )?))
    }

    /// The certificate chain served now (for tests and status).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.current()
    }
}

impl fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReloadingCertificate({:?})", self.0.paths)
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Client certificates are checked against the CAs in a file, followed like the
/// certificate. No CA names are hinted to clients (the hints would have to outlive a
/// reload); clients send the certificate they have.
pub struct ReloadingClientCa {
    verifier: Watched<Arc<dyn ClientCertVerifier>>,
}

fn client_verifier(
    paths: &[PathBuf],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let [ca_path] = paths else {
        unreachable!("one CA file")
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            path: ca_path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Invalid {
            path: ca_path.clone(),
            reason: e.to_string(),
        })
}

impl ReloadingClientCa {
    pub fn load(ca: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        Ok(ReloadingClientCa {
            verifier: Watched::load(
                vec![ca],
                Box::new(move |paths| client_verifier(paths, &provider)),
            )?,
        })
    }
}

impl fmt::Debug for ReloadingClientCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReloadingClientCa({:?})", self.verifier.paths)
    }
}

impl ClientCertVerifier for ReloadingClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier
            .current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .current()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .current()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.current().supported_verify_schemes()
    }
}
