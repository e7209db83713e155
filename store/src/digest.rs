//! Content digests: SHA-256 and BLAKE3, in both the REAPI and the OCI spelling.

use std::fmt;
use std::str::FromStr;

use kiln_proto::reapi;

use crate::StoreError;

/// The hash functions kiln accepts. Both produce 32-byte digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    Sha256,
    Blake3,
}

impl DigestFunction {
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The algorithm name used in OCI digests and in kiln's on-disk layout.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(DigestFunction::Sha256),
            "blake3" => Some(DigestFunction::Blake3),
            _ => None,
        }
    }

    /// The value of `build.bazel.remote.execution.v2.DigestFunction.Value`.
    pub fn reapi_value(self) -> i32 {
        match self {
            DigestFunction::Sha256 => 1,
            DigestFunction::Blake3 => 9,
        }
    }

    /// Maps a REAPI `DigestFunction.Value`. `UNKNOWN` (0) means SHA-256: clients older than
    /// REAPI 2.3 never set the field, and SHA-256 was the only function they could mean.
    pub fn from_reapi_value(value: i32) -> Result<Self, StoreError> {
        match value {
            0 | 1 => Ok(DigestFunction::Sha256),
            9 => Ok(DigestFunction::Blake3),
            other => Err(StoreError::UnsupportedDigestFunction(format!(
                "REAPI digest function {other}"
            ))),
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(<sha2::Sha256 as sha2::Digest>::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The digest of the empty blob, which every store holds implicitly. Hashed once:
    /// every presence check compares against it (10,000 per FindMissingBlobs).
    pub fn empty_digest(self) -> Digest {
        static EMPTY: std::sync::LazyLock<[Digest; 2]> =
            std::sync::LazyLock::new(|| DigestFunction::ALL.map(|f| f.hasher().finish()));
        EMPTY[self as usize]
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An incremental hasher for either function.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => sha2::Digest::update(h, data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn function(&self) -> DigestFunction {
        match self {
            Hasher::Sha256(_) => DigestFunction::Sha256,
            Hasher::Blake3(_) => DigestFunction::Blake3,
        }
    }

    /// Finishes the hash; `size` is not tracked here because callers already count bytes.
    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => sha2::Digest::finalize(h).into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }

    fn finish(self) -> Digest {
        let function = self.function();
        Digest::new(function, self.finalize(), 0)
    }
}

/// The name of a blob without its size: what OCI digests carry and what the
/// blob store files blobs under.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash {
    pub function: DigestFunction,
    pub bytes: [u8; 32],
}

impl ContentHash {
    pub fn hex(&self) -> String {
        const_hex::encode(self.bytes)
    }

    pub fn parse_hex(function: DigestFunction, hex_str: &str) -> Result<Self, StoreError> {
        let mut bytes = [0u8; 32];
        // Lower-case only: REAPI and OCI both define the canonical form as lower-case hex,
        // and accepting upper case would give one blob two names.
        if hex_str.len() != 64 || hex_str.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(StoreError::InvalidDigest(format!(
                "hash must be 64 lower-case hex characters, got {hex_str:?}"
            )));
        }
        const_hex::decode_to_slice(hex_str, &mut bytes)
            .map_err(|_| StoreError::InvalidDigest(format!("hash is not hex: {hex_str:?}")))?;
        Ok(ContentHash { function, bytes })
    }

    /// Parses the OCI form, `sha256:<hex>` or `blake3:<hex>`.
    pub fn parse_oci(s: &str) -> Result<Self, StoreError> {
        let (algorithm, encoded) = s
            .split_once(':')
            .ok_or_else(|| StoreError::InvalidDigest(format!("{s:?} has no algorithm prefix")))?;
        let function = DigestFunction::from_name(algorithm)
            .ok_or_else(|| StoreError::UnsupportedDigestFunction(algorithm.to_string()))?;
        Self::parse_hex(function, encoded)
    }

    /// The OCI form, `sha256:<hex>`.
    pub fn oci(&self) -> String {
        format!("{}:{}", self.function.name(), self.hex())
    }

    pub fn with_size(self, size: u64) -> Digest {
        Digest {
            function: self.function,
            hash: self.bytes,
            size,
        }
    }

    pub fn is_empty_blob(&self) -> bool {
        *self == self.function.empty_digest().content_hash()
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.oci())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.oci())
    }
}

impl FromStr for ContentHash {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_oci(s)
    }
}

/// Records store a hash as its OCI string, `"sha256:<hex>"`, and refuse anything else.
impl serde::Serialize for ContentHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ContentHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse_oci(&text).map_err(serde::de::Error::custom)
    }
}

/// A blob's full identity: hash function, hash and size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub function: DigestFunction,
    pub hash: [u8; 32],
    pub size: u64,
}

impl Digest {
    pub fn new(function: DigestFunction, hash: [u8; 32], size: u64) -> Self {
        Digest {
            function,
            hash,
            size,
        }
    }

    /// Hashes `data` in memory.
    pub fn of_bytes(function: DigestFunction, data: &[u8]) -> Self {
        let mut hasher = function.hasher();
        hasher.update(data);
        Digest::new(function, hasher.finalize(), data.len() as u64)
    }

    /// Parses the REAPI form: a hex hash and a size, the function given separately.
    pub fn parse_reapi(
        function: DigestFunction,
        hash: &str,
        size: i64,
    ) -> Result<Self, StoreError> {
        if size < 0 {
            return Err(StoreError::InvalidDigest(format!("negative size {size}")));
        }
        Ok(ContentHash::parse_hex(function, hash)?.with_size(size as u64))
    }

    /// The REAPI wire form (the function travels separately, in the request).
    pub fn to_reapi(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hex(),
            size_bytes: self.size as i64,
        }
    }

    /// Parses a REAPI wire digest under `function`.
    pub fn from_reapi(
        function: DigestFunction,
        digest: &reapi::Digest,
    ) -> Result<Self, StoreError> {
        Self::parse_reapi(function, &digest.hash, digest.size_bytes)
    }

    /// Parses `hash/size`, as it appears in ByteStream resource names.
    pub fn parse_hash_slash_size(function: DigestFunction, s: &str) -> Result<Self, StoreError> {
        let (hash, size) = s
            .split_once('/')
            .ok_or_else(|| StoreError::InvalidDigest(format!("{s:?} is not hash/size")))?;
        let size: i64 = size
            .parse()
            .map_err(|_| StoreError::InvalidDigest(format!("size {size:?} is not a number")))?;
        Self::parse_reapi(function, hash, size)
    }

    pub fn content_hash(&self) -> ContentHash {
        ContentHash {
            function: self.function,
            bytes: self.hash,
        }
    }

    pub fn hex(&self) -> String {
        const_hex::encode(self.hash)
    }

    /// The REAPI form, `hash/size`.
    pub fn reapi(&self) -> String {
        format!("{}/{}", self.hex(), self.size)
    }

    pub fn oci(&self) -> String {
        self.content_hash().oci()
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.content_hash().is_empty_blob()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.function, self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const BLAKE3_EMPTY: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn empty_digests_match_the_published_values() {
        assert_eq!(DigestFunction::Sha256.empty_digest().hex(), SHA256_EMPTY);
        assert_eq!(DigestFunction::Blake3.empty_digest().hex(), BLAKE3_EMPTY);
        assert!(DigestFunction::Blake3.empty_digest().is_empty_blob());
    }

    #[test]
    fn oci_form_round_trips() {
        let text = format!("sha256:{SHA256_EMPTY}");
        let hash: ContentHash = text.parse().unwrap();
        assert_eq!(hash.function, DigestFunction::Sha256);
        assert_eq!(hash.oci(), text);
        let b3: ContentHash = format!("blake3:{BLAKE3_EMPTY}").parse().unwrap();
        assert_eq!(b3.function, DigestFunction::Blake3);
    }

    #[test]
    fn reapi_form_round_trips() {
        let d = Digest::of_bytes(DigestFunction::Blake3, b"hello");
        let parsed = Digest::parse_hash_slash_size(DigestFunction::Blake3, &d.reapi()).unwrap();
        assert_eq!(parsed, d);
        assert_eq!(d.size, 5);
    }

    #[test]
    fn malformed_digests_are_rejected() {
        assert!(ContentHash::parse_oci("md5:abcd").is_err());
        assert!(ContentHash::parse_oci(SHA256_EMPTY).is_err());
        assert!(
            ContentHash::parse_oci(&format!("sha256:{}", SHA256_EMPTY.to_uppercase())).is_err()
        );
        assert!(ContentHash::parse_oci("sha256:abc").is_err());
        assert!(Digest::parse_reapi(DigestFunction::Sha256, SHA256_EMPTY, -1).is_err());
        assert!(Digest::parse_hash_slash_size(DigestFunction::Sha256, "zz/1").is_err());
        assert!(DigestFunction::from_reapi_value(2).is_err());
    }

    #[test]
    fn serde_form_is_the_oci_string() {
        let hash: ContentHash = format!("sha256:{SHA256_EMPTY}").parse().unwrap();
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"sha256:{SHA256_EMPTY}\""));
        assert_eq!(serde_json::from_str::<ContentHash>(&json).unwrap(), hash);
        // A record holding anything else fails to load rather than being skipped.
        assert!(serde_json::from_str::<ContentHash>("\"sha256:zz\"").is_err());
        assert!(serde_json::from_str::<ContentHash>("\"md5:00\"").is_err());
        assert!(serde_json::from_str::<ContentHash>("42").is_err());
    }
}
