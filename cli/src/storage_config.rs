//! Where blobs and metadata live: the `[storage]` and `[metadata]` tables, and the flags
//! and variables over them.

use kiln_object_store::S3Settings;
use kiln_postgres::PostgresSettings;
use serde::Deserialize;

/// The `[storage]` table: `backend = "fs"` (the default: files under the data directory)
/// or `backend = "s3"` with a bucket and its endpoint, region, prefix and credentials
/// ([`S3Settings`]), behind a local tier in `DATA_DIR/cas` bounded by `[cas]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum StorageConfig {
    #[default]
    Fs,
    S3(S3Settings),
}

/// The `[metadata]` table: `backend = "sled"` (the default: embedded, under the data
/// directory) or `backend = "postgres"` with a `url` ([`PostgresSettings`]), which
/// replicas share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum MetadataConfig {
    #[default]
    Sled,
    Postgres(PostgresSettings),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Fs,
    S3,
}

/// The storage flags, each also a `KILN_*` variable. Credentials are not among them:
/// they come from the file or the standard `AWS_*` variables.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StorageArgs {
    /// Where blobs live [default: fs]; s3 needs a bucket.
    #[arg(long, env = "KILN_STORAGE_BACKEND", global = true, value_enum)]
    pub storage_backend: Option<BackendArg>,
    #[arg(long, env = "KILN_S3_BUCKET", global = true)]
    pub s3_bucket: Option<String>,
    /// The S3 service's URL [default: AWS]; http:// only when given here.
    #[arg(long, env = "KILN_S3_ENDPOINT", global = true, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "KILN_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Keys are made under this prefix of the bucket.
    #[arg(long, env = "KILN_S3_PREFIX", global = true)]
    pub s3_prefix: Option<String>,
    /// Metadata in this PostgreSQL database (`postgres://user@host/db`) instead of the
    /// embedded sled; the password comes from `[metadata] password_file` or PGPASSWORD.
    #[arg(long, env = "KILN_POSTGRES_URL", global = true, value_name = "URL")]
    pub postgres_url: Option<String>,
}

impl StorageArgs {
    /// Lays the metadata flag over what the file said.
    pub fn apply_metadata(&self, config: &mut MetadataConfig) {
        let Some(url) = &self.postgres_url else {
            return;
        };
        match config {
            MetadataConfig::Postgres(settings) => settings.url = url.clone(),
            MetadataConfig::Sled => *config = MetadataConfig::Postgres(PostgresSettings::new(url)),
        }
    }

    /// Lays the flags over what the file said.
    pub fn apply(&self, config: &mut StorageConfig) -> anyhow::Result<()> {
        match self.storage_backend {
            Some(BackendArg::Fs) => *config = StorageConfig::Fs,
            Some(BackendArg::S3) if *config == StorageConfig::Fs => {
                let bucket = self.s3_bucket.clone().ok_or_else(|| {
                    anyhow::anyhow!("the s3 storage backend needs a bucket (--s3-bucket, KILN_S3_BUCKET or [storage] bucket)")
                })?;
                *config = StorageConfig::S3(S3Settings::new(bucket));
            }
            _ => {}
        }
        let StorageConfig::S3(settings) = config else {
            return Ok(());
        };
        if let Some(bucket) = &self.s3_bucket {
            settings.bucket = bucket.clone();
        }
        if let Some(endpoint) = &self.s3_endpoint {
            settings.endpoint = Some(endpoint.clone());
        }
        if let Some(region) = &self.s3_region {
            settings.region = region.clone();
        }
        if let Some(prefix) = &self.s3_prefix {
            settings.prefix = prefix.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_names_the_backend_and_flags_override_it() {
        let file: StorageConfig = toml::from_str(
            "backend = \"s3\"\nbucket = \"builds\"\nendpoint = \"http://127.0.0.1:3900\"\n",
        )
        .unwrap();
        let StorageConfig::S3(settings) = &file else {
            panic!("{file:?}")
        };
        assert_eq!(settings.region, "us-east-1");
        let mut config = file.clone();
        let args = StorageArgs {
            s3_prefix: Some("ci".into()),
            ..Default::default()
        };
        args.apply(&mut config).unwrap();
        let StorageConfig::S3(settings) = &config else {
            panic!("{config:?}")
        };
        assert_eq!(
            (settings.bucket.as_str(), settings.prefix.as_str()),
            ("builds", "ci")
        );

        let typo = toml::from_str::<StorageConfig>("backend = \"s3\"\nbuckett = \"x\"\n");
        assert!(typo.is_err(), "unknown keys are errors");
        assert_eq!(
            toml::from_str::<StorageConfig>("backend = \"fs\"\n").unwrap(),
            StorageConfig::Fs
        );
    }

    #[test]
    fn metadata_moves_to_postgres_by_file_or_flag() {
        let file: MetadataConfig = toml::from_str(
            "backend = \"postgres\"\nurl = \"postgres://kiln@db/kiln\"\npassword_file = \"/run/secrets/pg\"\n",
        )
        .unwrap();
        let MetadataConfig::Postgres(settings) = &file else {
            panic!("{file:?}")
        };
        assert_eq!(settings.pool_size, 16);
        let mut config = MetadataConfig::Sled;
        StorageArgs {
            postgres_url: Some("postgres://kiln@other/kiln".into()),
            ..Default::default()
        }
        .apply_metadata(&mut config);
        assert_eq!(
            config,
            MetadataConfig::Postgres(PostgresSettings::new("postgres://kiln@other/kiln"))
        );
    }

    #[test]
    fn the_s3_flag_needs_a_bucket() {
        let mut config = StorageConfig::Fs;
        let args = StorageArgs {
            storage_backend: Some(BackendArg::S3),
            ..Default::default()
        };
        let error = args.apply(&mut config).unwrap_err().to_string();
        assert!(error.contains("bucket"), "{error}");
    }
}
