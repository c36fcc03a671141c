//! What decoding an HPACK header block would cost, counted from its structure without
//! decoding a string: the number of header fields and of Huffman-coded strings in it.
//!
//! The `:authority` rewriter decodes every header block of a connection whose first request
//! carried an invalid authority, on an async worker. The decoder's cost grows with the
//! strings, not the bytes (it builds a Huffman table for every Huffman-coded string, even an
//! empty one: 64 KiB of `00 80 80` is 43,690 of them), so the rewriter checks a block's cost
//! before it decodes it, and counts it against the connection's budget.

/// The work one block may take: far more fields than any gRPC or KMS request sends.
pub(super) const MAX_FIELDS_PER_BLOCK: usize = 256;
/// The work one connection may take on the rewrite path, in header fields: about 4,000
/// requests of a typical gRPC client's 25 fields; a client that needs more reconnects.
pub(super) const MAX_FIELDS_PER_CONNECTION: u64 = 100_000;

/// A block's cost.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cost {
    /// Header fields (and table size updates).
    pub fields: usize,
    /// Huffman-coded strings.
    pub huffman: usize,
}

/// An HPACK integer with an `n`-bit prefix at `block[*at]` (RFC 7541 §5.1); `None` when the
/// block ends inside it or it overflows.
fn integer(block: &[u8], at: &mut usize, n: u32) -> Option<u64> {
    let mask = (1u16 << n) as u64 - 1;
    let mut value = u64::from(*block.get(*at)?) & mask;
    *at += 1;
    if value < mask {
        return Some(value);
    }
    let mut shift = 0u32;
    loop {
        let b = *block.get(*at)?;
        *at += 1;
        value = value.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

/// Skips a string literal (RFC 7541 §5.2); whether it was Huffman-coded, `None` when the
/// block ends inside it.
fn string(block: &[u8], at: &mut usize) -> Option<bool> {
    let huffman = *block.get(*at)? & 0x80 != 0;
    let len = usize::try_from(integer(block, at, 7)?).ok()?;
    *at = at.checked_add(len).filter(|end| *end <= block.len())?;
    Some(huffman)
}

/// The cost of `block`, counted up to `stop_after` fields (the caller's cap: counting further
/// would itself be work). A block malformed partway is counted as far as it goes; the
/// decoder then refuses it.
pub(super) fn cost(block: &[u8], stop_after: usize) -> Cost {
    let mut c = Cost::default();
    let mut at = 0usize;
    while at < block.len() && c.fields <= stop_after {
        let first = block[at];
        c.fields += 1;
        let (prefix, literal) = match first {
            b if b & 0x80 != 0 => (7, false),
            b if b & 0x40 != 0 => (6, true),
            b if b & 0x20 != 0 => (5, false),
            _ => (4, true),
        };
        let Some(index) = integer(block, &mut at, prefix) else {
            break;
        };
        if !literal {
            continue;
        }
        let mut strings = if index == 0 { 2 } else { 1 };
        while strings > 0 {
            match string(block, &mut at) {
                Some(true) => c.huffman += 1,
                Some(false) => {}
                None => return c,
            }
            strings -= 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fields_and_huffman_strings_without_decoding() {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"/var/run/kms.sock"),
            (b"x-custom", b"value"),
        ]);
        let c = cost(&block, MAX_FIELDS_PER_BLOCK);
        assert_eq!(c.fields, 3);
        // The bomb: literal without indexing, new name, both strings empty and Huffman-coded.
        let bomb: Vec<u8> = [0x00u8, 0x80, 0x80].repeat(1000);
        let c = cost(&bomb, usize::MAX);
        assert_eq!((c.fields, c.huffman), (1000, 2000));
        assert!(cost(&bomb, 10).fields <= 11, "counting stops at the cap");
        // Truncated and overflowing input is counted as far as it goes, without a panic.
        assert_eq!(cost(&[0x00, 0x85, b'a'], 10).fields, 1);
        assert_eq!(
            cost(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                10
            )
            .fields,
            1
        );
        assert_eq!(cost(&[], 10), Cost::default());
    }
}
