//! An [`ObjectBlobStore`] on a fresh Garage.

use std::sync::Arc;

use kiln_object_store::{
    connect_s3, ObjectBlobStore, ObjectStoreOptions, S3Settings, SecretString,
};
use kiln_testkit::{Garage, GARAGE_BUCKET};

/// The S3 settings that reach node `node` of `garage`, under `prefix`.
pub fn settings(garage: &Garage, node: usize, prefix: &str) -> S3Settings {
    let mut settings = S3Settings::new(GARAGE_BUCKET);
    settings.endpoint = Some(garage.endpoint(node));
    settings.region = garage.region().to_string();
    settings.prefix = prefix.to_string();
    settings.access_key_id = Some(garage.access_key_id().to_string());
    settings.secret_access_key = Some(SecretString::new(garage.secret_access_key()));
    settings
}

pub async fn open_store(garage: &Garage, prefix: &str) -> ObjectBlobStore {
    let settings = settings(garage, 0, prefix);
    let client = connect_s3(&settings).expect("an S3 client");
    let options = ObjectStoreOptions {
        prefix: prefix.to_string(),
        ..Default::default()
    };
    ObjectBlobStore::open(Arc::clone(&client), options)
        .await
        .expect("the store opens on Garage")
}
