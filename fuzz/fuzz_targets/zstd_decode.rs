//! zstd decoding of compressed blobs (kiln-coordinator `zstd_codec`): batch entries decode
//! to at most their declared size, and ByteStream's streaming decoder hands out bounded
//! pieces, consumes every message, and reproduces what was compressed whatever the
//! message boundaries.
#![no_main]

use arbitrary::Arbitrary;
use kiln_coordinator::fuzzing::{decompress, StreamingDecoder, DECODED_CHUNK};
use libfuzzer_sys::fuzz_target;

/// A batch's total, which bounds any entry's declared size before it is decoded.
const MAX_BATCH: u64 = 4 << 20;

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// A BatchUpdateBlobs entry: bytes off the wire and the size its digest claims.
    Batch { data: &'a [u8], declared: u32 },
    /// A ByteStream Write of untrusted bytes, cut into messages at these lengths.
    Stream { data: &'a [u8], cuts: Vec<u16> },
    /// Real zstd of `plain`, cut into messages.
    RoundTrip {
        plain: &'a [u8],
        level: i8,
        cuts: Vec<u16>,
    },
}

/// Feeds `data` in messages cut at `cuts`, checking each piece; returns what decoded.
fn stream(data: &[u8], cuts: &[u16]) -> Option<Vec<u8>> {
    let mut decoder = StreamingDecoder::new().unwrap();
    let mut decoded = Vec::new();
    let mut rest = data;
    let mut cuts = cuts
        .iter()
        .map(|&c| c as usize)
        .chain(std::iter::repeat(usize::MAX));
    while !rest.is_empty() {
        let (message, after) = rest.split_at(cuts.next().unwrap().min(rest.len()));
        rest = after;
        let mut consumed = 0;
        loop {
            match decoder.decode_next(message, &mut consumed) {
                Ok(Some(piece)) => {
                    assert!(!piece.is_empty() && piece.len() <= DECODED_CHUNK);
                    decoded.extend_from_slice(&piece);
                    // What the caller will do with a decoded blob past its size.
                    if decoded.len() as u64 > MAX_BATCH {
                        return None;
                    }
                }
                Ok(None) => break,
                Err(_) => return None,
            }
        }
        assert_eq!(consumed, message.len(), "a message was not used up");
    }
    Some(decoded)
}

fuzz_target!(|input: Input| match input {
    Input::Batch { data, declared } => {
        let declared = declared as u64 % (MAX_BATCH + 1);
        if let Ok(plain) = decompress(data, declared) {
            assert!(plain.len() as u64 <= declared);
        }
    }
    Input::Stream { data, cuts } => {
        let _ = stream(data, &cuts);
    }
    Input::RoundTrip { plain, level, cuts } => {
        let compressed = zstd::bulk::compress(plain, level as i32 % 20).unwrap();
        assert_eq!(stream(&compressed, &cuts).as_deref(), Some(plain));
        assert_eq!(decompress(&compressed, plain.len() as u64).unwrap(), plain);
        if !plain.is_empty() {
            assert!(decompress(&compressed, plain.len() as u64 - 1).is_err());
        }
    }
});
