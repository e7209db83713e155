//! The coordinator's configuration: the `[coordinator]` table of kiln's TOML file.

use serde::Deserialize;

/// HTTP/2 flow-control windows, of the server and of a follower's channel to its leader. The defaults (64 KiB) cap a single stream at a few
/// hundred MB/s even on loopback; large windows let one ByteStream call run at disk and
/// hash speed. Memory stays bounded because tonic reads a stream only as fast as the
/// handler consumes it.
pub(crate) const STREAM_WINDOW: u32 = 16 << 20;
/// Memory for the action-cache entries [`CoordinatorConfig::action_cache_recent_ms`]
/// keeps: tens of thousands of typical results.
pub const ACTION_CACHE_RECENT_BYTES: usize = 32 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 64 << 20;

/// Tunables for the REAPI services. Every field has a default, and unknown keys are an
/// error so that a typo never silently falls back to a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// The most bytes (sum of the blobs' uncompressed sizes) one BatchUpdateBlobs or
    /// BatchReadBlobs request may carry. Advertised in the capabilities; larger requests
    /// are refused with INVALID_ARGUMENT and clients use ByteStream instead.
    pub max_batch_total_size_bytes: u64,
    /// The most bytes of stdout, stderr and output files GetActionResult inlines into
    /// one response when the client asks for inlining. Anything past this stays a digest.
    pub max_inline_bytes: u64,
    /// The zstd level for compressed ByteStream reads and compressed BatchReadBlobs
    /// entries. Low levels keep reads close to disk speed.
    pub zstd_level: i32,
    /// The most directories one GetTree response carries, whatever page size the client
    /// asks for.
    pub max_tree_page_size: u32,
    /// How long an action cache hit counts as fresh use of the blobs it references.
    /// A hit refreshes their access time (for eviction) at most once per this interval,
    /// which keeps repeated hits as cheap as a metadata lookup.
    pub access_refresh_interval_secs: u64,
    /// The secret workers must present to join. Without one, no worker is accepted.
    /// (The CLI fills this from `--join-token` / `KILN_JOIN_TOKEN`; it is not a file key
    /// one should commit.)
    #[serde(skip)]
    pub join_token: Option<String>,
    /// How often workers send heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long loses its leases, which are requeued.
    pub heartbeat_timeout_secs: u64,
    /// How many times an action may be handed to a worker (lost workers count) before
    /// it fails with UNAVAILABLE instead of running forever.
    pub max_attempts: u32,
    /// The largest Action, Command, Directory or Tree message the coordinator reads into
    /// memory. A client naming a larger one gets INVALID_ARGUMENT before anything is read.
    pub max_message_bytes: u64,
    /// The longest timeout an action may ask for. Asking for more is INVALID_ARGUMENT
    /// rather than a silent clamp: a build that needs it should be told, not cut short.
    pub max_action_timeout_secs: u64,
    /// Unfinished (queued or running) operations one instance name may have. Past it,
    /// Execute gets RESOURCE_EXHAUSTED, which Bazel retries with backoff.
    pub max_in_flight_per_instance: usize,
    /// Unfinished operations across every instance (instance names are the client's to
    /// choose, so the per-instance bound alone bounds nothing).
    pub max_in_flight: usize,
    /// The most distinct directories one GetTree walk visits; a larger tree is refused
    /// with INVALID_ARGUMENT rather than held in memory.
    pub max_tree_directories: usize,
    /// How long an action may wait for a worker that offers its platform. When no
    /// connected worker has offered it for this long, the action fails with
    /// FAILED_PRECONDITION naming the platform. 0 waits forever (for a pool that scales
    /// up from nothing slower than this).
    pub unmatched_platform_timeout_secs: u64,
    /// A ByteStream upload nobody has written to for this long is abandoned: its kept
    /// bytes are removed (at start-up, and then periodically).
    pub upload_ttl_secs: u64,
    /// The most action-cache entries kept; past it the least recently used go (down to
    /// 90 % of it), checked at start-up and every minute.
    pub max_action_cache_entries: u64,
    /// An action-cache entry read or stored this recently is answered from memory (at
    /// most 32 MiB of them) without asking the metadata store again:
    /// on PostgreSQL, a round trip saved per hit. A result another replica replaces or
    /// removes may be served this long after; 0 asks the store every time.
    pub action_cache_recent_ms: u64,
    /// A client stream (a ByteStream upload, a worker's connection before it registers)
    /// that sends nothing for this long is closed with DEADLINE_EXCEEDED.
    pub stream_idle_timeout_secs: u64,
    /// A worker must send its Register this soon after connecting.
    pub register_timeout_secs: u64,
    /// Open connections one client address may have; more are closed at once (0: no
    /// limit). A Bazel client uses a few; a host opening thousands is not a client.
    pub max_connections_per_address: usize,
    /// HTTP/2 streams (concurrent calls) one connection may have open; more are refused
    /// with REFUSED_STREAM, which gRPC clients retry. Bazel opens up to `--jobs` at once.
    pub max_concurrent_streams: u32,
    /// Seconds between HTTP/2 keepalive pings, and how long an unanswered one waits
    /// before the connection is closed: a peer that vanished frees its streams.
    pub keepalive_interval_secs: u64,
    pub keepalive_timeout_secs: u64,
    /// The `[coordinator.auth]` table: who may call the REAPI and admin APIs.
    pub auth: AuthConfig,
    /// The `[coordinator.farm]` table: many coordinators on one metadata store as one farm.
    pub farm: FarmConfig,
}

/// Many coordinators sharing one metadata store (PostgreSQL) and one blob store as one
/// farm: every replica serves the stores, one elected leader schedules, and the others
/// send Execution, Operations and worker streams on to it (see `farm.rs`). Off by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FarmConfig {
    pub enabled: bool,
    /// Where the other replicas reach this one (`http://10.0.0.7:9092`): its own gRPC
    /// listener, as seen from them.
    pub advertise_url: String,
    /// The leader's lease term. A leader that dies is replaced within about 1.25 terms
    /// (followers watch for a whole term without a renewal, in rounds of a quarter term).
    pub lease_term_secs: u64,
    /// With `https://` advertise URLs: the PEM CA certificates a leader's certificate
    /// must chain to (unset: the system's). A follower presents the server's own
    /// certificate (`tls.cert`) to the leader, so with `tls.client_ca` that certificate
    /// must chain to the client CA too.
    pub ca_file: Option<std::path::PathBuf>,
    /// With `https://` advertise URLs that name addresses (a pod's IP): the name the
    /// leader's certificate carries instead.
    pub server_name: Option<String>,
}

impl Default for FarmConfig {
    fn default() -> Self {
        FarmConfig {
            enabled: false,
            advertise_url: String::new(),
            lease_term_secs: 6,
            ca_file: None,
            server_name: None,
        }
    }
}

/// Token authentication for the coordinator's APIs (see `auth.rs`). Off by default, so
/// that `kiln up` on loopback works at once; a coordinator bound off loopback refuses to
/// start without it unless told `--allow-unauthenticated`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Every call but GetCapabilities, health and the worker protocol needs a token.
    pub enabled: bool,
    /// Tokens declared here, by hash (`kiln token generate` prints one with its hash);
    /// `kiln token create` adds more at run time.
    pub tokens: Vec<crate::auth::ConfiguredToken>,
    /// With mutual TLS: scopes for client certificates by subject common name, for
    /// clients that present no token (Bazel 2.1 sends none on its uploads).
    pub client_certificates: Vec<crate::auth::CertificateGrant>,
    /// Scopes granted to calls with no credentials at all; empty by default. For old
    /// clients: Bazel 2.1 sends no header on its ByteStream uploads, so with a token it
    /// can execute remotely only if `cas:write` is granted here. CAS writes are checked
    /// against their digest, so they cannot poison anything; they do take room, which the
    /// CAS's limit bounds.
    pub anonymous_scopes: Vec<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            max_batch_total_size_bytes: 4 << 20,
            max_inline_bytes: 1 << 20,
            zstd_level: 1,
            max_tree_page_size: 1000,
            access_refresh_interval_secs: 300,
            join_token: None,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_secs: 10,
            max_attempts: 3,
            max_message_bytes: 4 << 20,
            max_action_timeout_secs: 6 * 60 * 60,
            max_in_flight_per_instance: 50_000,
            max_in_flight: 200_000,
            max_tree_directories: 250_000,
            unmatched_platform_timeout_secs: 600,
            upload_ttl_secs: 24 * 60 * 60,
            max_action_cache_entries: 1_000_000,
            action_cache_recent_ms: 2000,
            stream_idle_timeout_secs: 60,
            register_timeout_secs: 10,
            max_concurrent_streams: 1024,
            max_connections_per_address: 256,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 20,
            auth: AuthConfig::default(),
            farm: FarmConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_to_missing_keys() {
        let config: CoordinatorConfig = toml::from_str("zstd_level = 3").unwrap();
        assert_eq!(config.zstd_level, 3);
        assert_eq!(
            config.max_batch_total_size_bytes,
            CoordinatorConfig::default().max_batch_total_size_bytes
        );
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let err = toml::from_str::<CoordinatorConfig>("max_batch_bytes = 1").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
