//! The registry's `Range` (blob GET) and `Content-Range`/`Content-Length` (chunked upload
//! PATCH) parsing, on any header bytes and blob size.
#![no_main]

use arbitrary::Arbitrary;
use kiln_registry::fuzzing::{chunk_start, content_range, requested_range};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Header<'a> {
    /// Any bytes.
    Raw(&'a [u8]),
    /// `<unit><start>-<end>`: well-formed numbers, which raw bytes rarely reach at the
    /// edges (0, u64::MAX).
    Numbers {
        unit: u8,
        start: Option<u64>,
        end: Option<u64>,
    },
}

impl Header<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Header::Raw(bytes) => bytes.to_vec(),
            Header::Numbers { unit, start, end } => {
                let unit = ["bytes=", "bytes ", ""][*unit as usize % 3];
                let number = |n: &Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
                format!("{unit}{}-{}", number(start), number(end)).into_bytes()
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    header: Header<'a>,
    size: u64,
    content_length: Header<'a>,
}

fuzz_target!(|input: Input| {
    let range = input.header.bytes();
    let content_length = match &input.content_length {
        Header::Raw(bytes) => bytes.to_vec(),
        Header::Numbers { start, .. } => start.unwrap_or_default().to_string().into_bytes(),
    };
    let size = input.size;
    // A range served lies inside the blob and is not empty.
    if let Some(Ok(Some((start, end)))) = requested_range(&range, size) {
        assert!(start <= end && end < size, "{start}-{end} of {}", size);
    }
    if let Some(Ok(Some((start, end)))) = content_range(&range) {
        assert!(start <= end);
        // A chunk's declared length must agree with its range, exactly.
        let length = (end - start).checked_add(1);
        let declared = length.map(|l| l.to_string()).unwrap_or_default();
        match chunk_start(&range, declared.as_bytes()) {
            Some(Ok(Some(at))) => assert!(length.is_some() && at == start),
            Some(Ok(None)) => unreachable!("the Content-Range was there"),
            Some(Err(_)) => assert!(length.is_none(), "length {declared} refused"),
            None => assert!(declared.is_empty()),
        }
    }
    // And any Content-Length: never a panic, and a start only when the two agree.
    if let Some(Ok(Some(at))) = chunk_start(&range, &content_length) {
        let (start, _) = content_range(&range).unwrap().unwrap().unwrap();
        assert_eq!(at, start);
    }
});
