//! ByteStream resource names (kiln-store `ResourceName`): what parses prints in its
//! canonical form and parses back to the same value, and what is built prints to a name
//! that parses to what was built.
#![no_main]

use arbitrary::Arbitrary;
use kiln_store::{Compression, Digest, DigestFunction, ResourceName, RESERVED_SEGMENTS};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// A name off the wire, read or write.
    Wire(&'a str),
    /// A name kiln itself builds (the client and the worker format these).
    Built {
        instance_name: Vec<&'a str>,
        upload_uuid: Option<&'a str>,
        zstd: bool,
        blake3: bool,
        hash: [u8; 32],
        size: u64,
    },
}

fn round_trip(parsed: &ResourceName, write: bool) {
    let text = parsed.to_string();
    let again = if write {
        ResourceName::parse_write(&text)
    } else {
        ResourceName::parse_read(&text)
    };
    assert_eq!(again.as_ref(), Ok(parsed), "{text}");
    // Canonical means a fixed point.
    assert_eq!(again.unwrap().to_string(), text);
}

fuzz_target!(|input: Input| match input {
    Input::Wire(name) => {
        if let Ok(parsed) = ResourceName::parse_read(name) {
            assert!(parsed.upload_uuid.is_none());
            round_trip(&parsed, false);
        }
        if let Ok(parsed) = ResourceName::parse_write(name) {
            assert!(parsed.upload_uuid.as_deref().is_some_and(|u| !u.is_empty()));
            round_trip(&parsed, true);
        }
    }
    Input::Built {
        instance_name,
        upload_uuid,
        zstd,
        blake3,
        hash,
        size,
    } => {
        // REAPI forbids these segments in instance names (a parser cannot tell them from
        // the resource's own), and kiln's upload ids are UUIDs, one segment.
        let instance_name = instance_name.join("/");
        if instance_name
            .split('/')
            .any(|s| RESERVED_SEGMENTS.contains(&s))
            || upload_uuid.is_some_and(|u| u.is_empty() || u.contains('/'))
        {
            return;
        }
        let function = if blake3 {
            DigestFunction::Blake3
        } else {
            DigestFunction::Sha256
        };
        let name = ResourceName {
            instance_name,
            upload_uuid: upload_uuid.map(str::to_string),
            compression: if zstd {
                Compression::Zstd
            } else {
                Compression::Identity
            },
            digest: Digest::new(function, hash, size),
        };
        let text = name.to_string();
        let parsed = if name.upload_uuid.is_some() {
            ResourceName::parse_write(&text)
        } else {
            ResourceName::parse_read(&text)
        };
        // Not every built name is valid (an instance name may hold a reserved word, a
        // size may exceed REAPI's int64); one that parses must mean what was built.
        if let Ok(parsed) = parsed {
            assert_eq!(parsed, name, "{text}");
        }
    }
});
