//! The `:authority` rewriter (`src/server/authority.rs`) on arbitrary client bytes after the
//! HTTP/2 preface, fed in pieces of any size (the first byte picks the size): it refuses the
//! connection or hands bytes on, and never panics or hangs (the per-block and per-connection
//! HPACK work caps bound the time one input may take).
#![no_main]

use libfuzzer_sys::fuzz_target;
use localkms::server::bench_support::shim_in_pieces;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(rest);
    let _ = shim_in_pieces(&input, usize::from(chunk) + 1);
});
