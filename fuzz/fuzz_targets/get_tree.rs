//! GetTree in kiln-coordinator (`TreeWalk` served as `TreePages`) over Directory messages a
//! client stored: any DAG, dangling and malformed children, with any page size and page
//! token. The walk ends; it hands out stored directories only, each distinct one once,
//! the root first, never more than the limit; pages respect their size; and the pages
//! from a token are exactly the rest of the walk from the start.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use arbitrary::Arbitrary;
use kiln_coordinator::fuzzing::get_tree_pages;
use kiln_fuzz::{block_on, directory_dag, Entry};
use kiln_proto::prost::Message;
use kiln_proto::reapi::Directory;
use kiln_store::{BlobStore, Digest, DigestFunction, ExpectedDigest, MemoryBlobStore};
use libfuzzer_sys::fuzz_target;

const FUNCTION: DigestFunction = DigestFunction::Sha256;
const MAX_DIRECTORIES: usize = 64;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The first is the root. A child directory is one after it (only a DAG has real
    /// digests), or, pointing before it, a digest nothing was stored under.
    directories: Vec<Vec<Entry>>,
    /// Directories not stored, by index: their parents' links dangle.
    unstored: Vec<u8>,
    page_size: u8,
    page_token: u8,
}

fuzz_target!(|input: Input| {
    let count = input.directories.len();
    if count == 0 || count > 4 * MAX_DIRECTORIES {
        return;
    }
    let (messages, digests) = directory_dag(&input.directories);
    let unstored: HashSet<usize> = input.unstored.iter().map(|i| *i as usize % count).collect();
    let blobs = Arc::new(MemoryBlobStore::new());
    // The empty blob (an empty Directory's encoding) is in every CAS.
    let mut stored = HashSet::from([Digest::of_bytes(FUNCTION, b"")]);
    for (index, message) in messages.iter().enumerate() {
        if index == 0 || !unstored.contains(&index) {
            let put = blobs.put(
                ExpectedDigest::Exact(digests[index]),
                message.encode_to_vec().into(),
            );
            block_on(put).unwrap();
            stored.insert(digests[index]);
        }
    }
    let walk = |token: u64, size: usize| {
        block_on(get_tree_pages(
            blobs.clone(),
            digests[0],
            MAX_DIRECTORIES,
            1 << 20,
            token,
            size,
        ))
    };
    let page_size = usize::from(input.page_size.max(1));
    let Ok(pages) = walk(0, page_size) else {
        return;
    };
    let all: Vec<&Directory> = pages.iter().flat_map(|p| &p.directories).collect();
    assert_eq!(
        all.first().copied(),
        Some(&messages[0]),
        "the root comes first"
    );
    assert!(all.len() <= MAX_DIRECTORIES, "{} directories", all.len());
    let mut seen = HashSet::new();
    for directory in &all {
        let digest = Digest::of_bytes(FUNCTION, &directory.encode_to_vec());
        assert!(stored.contains(&digest), "a directory nobody stored");
        assert!(seen.insert(digest), "a directory twice");
    }
    for (at, page) in pages.iter().enumerate() {
        assert!(page.directories.len() <= page_size);
        let last = at + 1 == pages.len();
        assert_eq!(page.next_page_token.is_empty(), last, "token on page {at}");
    }
    // Resuming at a token gives the rest of the same walk.
    let token = u64::from(input.page_token) % (all.len() as u64 + 1);
    let rest = walk(token, page_size).expect("the walk succeeded from the start");
    let resumed: Vec<&Directory> = rest.iter().flat_map(|p| &p.directories).collect();
    assert_eq!(resumed, all[token as usize..].to_vec());
});
