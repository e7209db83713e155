//! The [`MetadataStore`] contract. Each check uses keyspaces of its own, so all of them
//! can share one store.

use std::sync::Arc;

use futures::TryStreamExt;

use crate::{
    scan_stream, Entry, Keyspace, MetadataError, MetadataStore, WriteBatch, MAX_SCAN_PAGE,
};

/// Runs every check on `store`, which must start empty.
pub async fn all(store: Arc<dyn MetadataStore>) {
    get_insert_remove(store.as_ref()).await;
    keyspaces_are_separate(store.as_ref()).await;
    compare_and_swap_reports_the_current_value(store.as_ref()).await;
    a_batch_applies_in_order_across_keyspaces(store.as_ref()).await;
    a_batch_with_a_failed_expectation_writes_nothing(store.as_ref()).await;
    scans_page_within_a_prefix(store.as_ref()).await;
    a_scan_page_is_bounded(store.as_ref()).await;
    scan_stream_visits_every_page(store.clone()).await;
    store.flush().await.expect("flush succeeds");
}

fn keys(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
        .collect()
}

pub async fn get_insert_remove(store: &dyn MetadataStore) {
    const SPACE: Keyspace = Keyspace("conformance.basic");
    assert_eq!(store.get(SPACE, b"k").await.unwrap(), None);
    assert_eq!(store.insert(SPACE, b"k", b"1").await.unwrap(), None);
    assert_eq!(
        store.insert(SPACE, b"k", b"2").await.unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(store.get(SPACE, b"k").await.unwrap(), Some(b"2".to_vec()));
    // Empty keys and values, and bytes that are not UTF-8, are ordinary.
    store.insert(SPACE, b"", b"").await.unwrap();
    store.insert(SPACE, &[0, 255], &[255, 0]).await.unwrap();
    assert_eq!(store.get(SPACE, b"").await.unwrap(), Some(Vec::new()));
    assert_eq!(
        store.get(SPACE, &[0, 255]).await.unwrap(),
        Some(vec![255, 0])
    );
    assert_eq!(
        store.remove(SPACE, b"k").await.unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(store.remove(SPACE, b"k").await.unwrap(), None);
    assert_eq!(store.get(SPACE, b"k").await.unwrap(), None);
}

pub async fn keyspaces_are_separate(store: &dyn MetadataStore) {
    const A: Keyspace = Keyspace("conformance.a");
    const B: Keyspace = Keyspace("conformance.b");
    store.insert(A, b"shared", b"a").await.unwrap();
    store.insert(B, b"shared", b"b").await.unwrap();
    assert_eq!(store.get(A, b"shared").await.unwrap(), Some(b"a".to_vec()));
    assert_eq!(store.get(B, b"shared").await.unwrap(), Some(b"b".to_vec()));
    store.remove(A, b"shared").await.unwrap();
    assert_eq!(store.get(B, b"shared").await.unwrap(), Some(b"b".to_vec()));
    assert_eq!(
        keys(&store.scan(A, b"", None, 10).await.unwrap()),
        Vec::<String>::new()
    );
}

pub async fn compare_and_swap_reports_the_current_value(store: &dyn MetadataStore) {
    const SPACE: Keyspace = Keyspace("conformance.cas");
    assert_eq!(
        store
            .compare_and_swap(SPACE, b"k", None, Some(b"1"))
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        store
            .compare_and_swap(SPACE, b"k", None, Some(b"2"))
            .await
            .unwrap(),
        Err(Some(b"1".to_vec()))
    );
    assert_eq!(
        store
            .compare_and_swap(SPACE, b"k", Some(b"0"), Some(b"2"))
            .await
            .unwrap(),
        Err(Some(b"1".to_vec()))
    );
    assert_eq!(
        store
            .compare_and_swap(SPACE, b"k", Some(b"1"), Some(b"2"))
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        store
            .compare_and_swap(SPACE, b"k", Some(b"2"), None)
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(store.get(SPACE, b"k").await.unwrap(), None);
    assert_eq!(
        store
            .compare_and_swap(SPACE, b"k", Some(b"2"), Some(b"3"))
            .await
            .unwrap(),
        Err(None),
        "a conflict on an absent key reports absence"
    );
}

pub async fn a_batch_applies_in_order_across_keyspaces(store: &dyn MetadataStore) {
    const A: Keyspace = Keyspace("conformance.batch.a");
    const B: Keyspace = Keyspace("conformance.batch.b");
    store.insert(A, b"old", b"x").await.unwrap();
    let mut batch = WriteBatch::new();
    batch.put(A, b"k".to_vec(), b"first".to_vec());
    batch.put(B, b"k".to_vec(), b"b".to_vec());
    batch.delete(A, b"old".to_vec());
    batch.put(A, b"k".to_vec(), b"second".to_vec());
    batch.delete(B, b"never-there".to_vec());
    assert_eq!(batch.len(), 5);
    store.apply(batch).await.expect("a batch applies");
    assert_eq!(
        store.get(A, b"k").await.unwrap(),
        Some(b"second".to_vec()),
        "the later write wins"
    );
    assert_eq!(store.get(B, b"k").await.unwrap(), Some(b"b".to_vec()));
    assert_eq!(store.get(A, b"old").await.unwrap(), None);
    store
        .apply(WriteBatch::new())
        .await
        .expect("an empty batch applies");
}

pub async fn a_batch_with_a_failed_expectation_writes_nothing(store: &dyn MetadataStore) {
    const SPACE: Keyspace = Keyspace("conformance.expect");
    const OTHER: Keyspace = Keyspace("conformance.expect.other");
    store.insert(SPACE, b"tag", b"v1").await.unwrap();
    let conditional = |expected: Option<&[u8]>, value: &[u8]| {
        let mut batch = WriteBatch::new();
        batch.expect(SPACE, b"tag".to_vec(), expected.map(<[u8]>::to_vec));
        batch.put(SPACE, b"tag".to_vec(), value.to_vec());
        batch.put(OTHER, value.to_vec(), Vec::new());
        batch
    };
    match store.apply(conditional(Some(b"v0"), b"v2")).await {
        Err(MetadataError::Conflict { .. }) => {}
        other => panic!("a stale expectation: expected Conflict, got {other:?}"),
    }
    match store.apply(conditional(None, b"v2")).await {
        Err(MetadataError::Conflict { .. }) => {}
        other => panic!("expecting absence of a present key: expected Conflict, got {other:?}"),
    }
    assert_eq!(
        store.get(SPACE, b"tag").await.unwrap(),
        Some(b"v1".to_vec())
    );
    assert_eq!(
        store.get(OTHER, b"v2").await.unwrap(),
        None,
        "a failed batch wrote part of itself"
    );
    store
        .apply(conditional(Some(b"v1"), b"v3"))
        .await
        .expect("a holding expectation applies");
    assert_eq!(
        store.get(SPACE, b"tag").await.unwrap(),
        Some(b"v3".to_vec())
    );
    assert_eq!(store.get(OTHER, b"v3").await.unwrap(), Some(Vec::new()));
    // Expecting absence of an absent key holds.
    let mut batch = WriteBatch::new();
    batch.expect(SPACE, b"new".to_vec(), None);
    batch.put(SPACE, b"new".to_vec(), b"1".to_vec());
    store.apply(batch).await.unwrap();
    assert_eq!(store.get(SPACE, b"new").await.unwrap(), Some(b"1".to_vec()));
}

pub async fn scans_page_within_a_prefix(store: &dyn MetadataStore) {
    const SPACE: Keyspace = Keyspace("conformance.scan");
    for key in ["a/1", "a/2", "a/3", "b/1", "a", "a0"] {
        store
            .insert(SPACE, key.as_bytes(), key.as_bytes())
            .await
            .unwrap();
    }
    let scan = |prefix: &'static str, after: Option<&'static str>, limit| async move {
        keys(
            &store
                .scan(SPACE, prefix.as_bytes(), after.map(str::as_bytes), limit)
                .await
                .unwrap(),
        )
    };
    assert_eq!(scan("a/", None, 2).await, ["a/1", "a/2"]);
    assert_eq!(scan("a/", Some("a/2"), 10).await, ["a/3"]);
    assert_eq!(scan("a/", Some("a/3"), 10).await, Vec::<String>::new());
    // `after` sorting before the prefix starts at the prefix, not at nothing.
    assert_eq!(scan("a/", Some("a"), 10).await, ["a/1", "a/2", "a/3"]);
    assert_eq!(scan("b/", Some("a/9"), 10).await, ["b/1"]);
    // `after` past the prefix's range finds nothing.
    assert_eq!(scan("a/", Some("b"), 10).await, Vec::<String>::new());
    assert_eq!(
        scan("", None, 10).await,
        ["a", "a/1", "a/2", "a/3", "a0", "b/1"]
    );
    assert_eq!(scan("a/", None, 0).await, Vec::<String>::new());
    let values = store.scan(SPACE, b"b/", None, 10).await.unwrap();
    assert_eq!(values, [(b"b/1".to_vec(), b"b/1".to_vec())]);
}

pub async fn a_scan_page_is_bounded(store: &dyn MetadataStore) {
    const SPACE: Keyspace = Keyspace("conformance.bounded");
    let mut batch = WriteBatch::new();
    for i in 0..MAX_SCAN_PAGE + 5 {
        batch.put(SPACE, format!("{i:06}").into_bytes(), Vec::new());
    }
    store.apply(batch).await.unwrap();
    let page = store.scan(SPACE, b"", None, usize::MAX).await.unwrap();
    assert_eq!(
        page.len(),
        MAX_SCAN_PAGE,
        "a scan returns at most MAX_SCAN_PAGE entries"
    );
}

pub async fn scan_stream_visits_every_page(store: Arc<dyn MetadataStore>) {
    const SPACE: Keyspace = Keyspace("conformance.stream");
    let total = 2 * MAX_SCAN_PAGE + 7;
    let mut batch = WriteBatch::new();
    for i in 0..total {
        batch.put(
            SPACE,
            format!("in/{i:06}").into_bytes(),
            i.to_string().into_bytes(),
        );
    }
    batch.put(SPACE, b"out/1".to_vec(), Vec::new());
    store.apply(batch).await.unwrap();
    let entries: Vec<Entry> = scan_stream(store.clone(), SPACE, b"in/".to_vec())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(entries.len(), total);
    assert!(entries.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    assert_eq!(
        entries.last().unwrap().1,
        (total - 1).to_string().into_bytes()
    );
    // An exact multiple of a page ends too.
    const EXACT: Keyspace = Keyspace("conformance.stream.exact");
    let mut batch = WriteBatch::new();
    for i in 0..MAX_SCAN_PAGE {
        batch.put(EXACT, format!("{i:06}").into_bytes(), Vec::new());
    }
    store.apply(batch).await.unwrap();
    let count = scan_stream(store, EXACT, Vec::new())
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .len();
    assert_eq!(count, MAX_SCAN_PAGE);
}
