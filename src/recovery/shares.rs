//! Split custody of the recovery identity: Shamir secret sharing over GF(2^8) (the `vsss-rs`
//! crate), so any K of N people can rebuild the identity and fewer than K learn nothing.
//!
//! A share is a small text file that says what it is: which set it belongs to (a random id
//! drawn at split time), its number, K and N, and the recipient the rebuilt identity must
//! match, so a combine with shares from two sets, too few shares or a damaged share fails
//! with a message instead of producing a wrong key.

use std::collections::BTreeMap;

use base64::Engine as _;
use zeroize::Zeroizing;

/// First line of every share file.
pub const SHARE_HEADER: &str = "localkms recovery share v1";

/// Why shares cannot be made or combined.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// K and N out of range.
    #[error(
        "need 2 <= --threshold <= --shares <= 255 (got threshold {threshold}, shares {shares})"
    )]
    Params {
        /// K.
        threshold: usize,
        /// N.
        shares: usize,
    },
    /// The identity file does not hold exactly one identity.
    #[error("the identity file must hold exactly one age identity to split")]
    NotOneIdentity,
    /// A share file does not parse.
    #[error("{name}: not a localkms recovery share ({why})")]
    Malformed {
        /// The share, as given.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Shares from different splits.
    #[error("{name} belongs to share set {theirs}, but {first} belongs to set {ours}: shares from different splits cannot be combined")]
    MixedSets {
        /// The odd share.
        name: String,
        /// Its set.
        theirs: String,
        /// The first share.
        first: String,
        /// The first share's set.
        ours: String,
    },
    /// The same share twice.
    #[error("{name} is share {number} again; each share counts once")]
    Duplicate {
        /// The repeated share.
        name: String,
        /// Its number.
        number: u8,
    },
    /// Fewer than K shares.
    #[error("{have} share(s) given, but this set needs {threshold} of {shares}: find {more} more")]
    TooFew {
        /// Shares given.
        have: usize,
        /// K.
        threshold: usize,
        /// N.
        shares: usize,
        /// How many are missing.
        more: usize,
    },
    /// The shares combined into something that is not the identity.
    #[error("the shares combined into a key that does not match the set's recipient {recipient}: at least one share is damaged")]
    Mismatch {
        /// The recipient the shares name.
        recipient: String,
    },
    /// The random source or the sharing library failed.
    #[error("cannot split: {0}")]
    Split(String),
}

/// One parsed share.
pub struct Share {
    /// Random id of the split it came from (hex).
    pub set: String,
    /// Its number, 1..=N.
    pub number: u8,
    /// K.
    pub threshold: u8,
    /// N.
    pub shares: u8,
    /// The recipient of the identity the set rebuilds.
    pub recipient: String,
    /// vsss-rs share bytes: the x coordinate, then one y byte per secret byte.
    data: Vec<u8>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the share bytes: K of them rebuild the recovery identity.
        f.debug_struct("Share")
            .field("set", &self.set)
            .field("number", &self.number)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("recipient", &self.recipient)
            .finish_non_exhaustive()
    }
}

/// The OS random source (ring) as the `rand_core` 0.10 generator vsss-rs asks for. A failure
/// is remembered and reported after the split instead of panicking inside the library.
struct SystemRng {
    failed: bool,
}

impl rand_core::TryRng for SystemRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for SystemRng {}

impl SystemRng {
    fn fill(&mut self, dst: &mut [u8]) {
        if crate::crypto::fill_random(dst).is_err() {
            self.failed = true;
        }
    }
}

/// Splits `identity_text` (an identity file holding one identity) into `shares` share files'
/// text, any `threshold` of which rebuild it.
pub fn split(
    identity_text: &str,
    threshold: usize,
    shares: usize,
) -> Result<Vec<(u8, String)>, ShareError> {
    if !(2..=255).contains(&threshold) || threshold > shares || shares > 255 {
        return Err(ShareError::Params { threshold, shares });
    }
    let recipient =
        super::sealing::recipient_of(identity_text).ok_or(ShareError::NotOneIdentity)?;
    let secret = Zeroizing::new(
        identity_text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or(ShareError::NotOneIdentity)?
            .as_bytes()
            .to_vec(),
    );
    let mut set = [0u8; 8];
    crate::crypto::fill_random(&mut set).map_err(|e| ShareError::Split(e.to_string()))?;
    let set = super::export::hex(&set);
    let mut rng = SystemRng { failed: false };
    let ids = (1..=shares as u8).map(|n| vsss_rs::IdentifierGf256(vsss_rs::Gf256(n)));
    let raw = vsss_rs::Gf256::split_bytes_with_participant_ids_iter(
        threshold,
        shares,
        &secret[..],
        &mut rng,
        ids,
    )
    .map_err(|e| ShareError::Split(format!("{e:?}")))?;
    if rng.failed {
        return Err(ShareError::Split("the OS random source failed".into()));
    }
    Ok(raw
        .into_iter()
        .map(|data| {
            let number = data.first().copied().unwrap_or(0);
            let text = format!(
                "{SHARE_HEADER}\n# Share {number} of {shares}: any {threshold} of the {shares} shares of set {set} rebuild the\n# localkms recovery identity for {recipient}. Alone it reveals nothing.\n# Rebuild with: localkms recovery combine --out identity.txt SHARE-FILE...\nset: {set}\nnumber: {number}\nthreshold: {threshold}\nshares: {shares}\nrecipient: {recipient}\ndata: {}\n",
                base64::engine::general_purpose::STANDARD.encode(&data)
            );
            (number, text)
        })
        .collect())
}

/// Parses one share file's text (`name` is used in messages).
pub fn parse(name: &str, text: &str) -> Result<Share, ShareError> {
    let bad = |why: &str| ShareError::Malformed {
        name: name.to_owned(),
        why: why.to_owned(),
    };
    let mut lines = text.lines().map(str::trim);
    if lines.next() != Some(SHARE_HEADER) {
        return Err(bad(&format!("it does not start with {SHARE_HEADER:?}")));
    }
    let mut fields = BTreeMap::new();
    for line in lines {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(&format!("line {line:?} is not `name: value`")))?;
        fields.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let field = |k: &str| {
        fields
            .get(k)
            .cloned()
            .ok_or_else(|| bad(&format!("no {k:?} line")))
    };
    let num = |k: &str| -> Result<u8, ShareError> {
        field(k)?
            .parse::<u8>()
            .map_err(|_| bad(&format!("{k:?} is not a number from 1 to 255")))
    };
    let (number, threshold, shares) = (num("number")?, num("threshold")?, num("shares")?);
    if number == 0 || number > shares || threshold < 2 || threshold > shares {
        return Err(bad("its number, threshold and shares do not fit together"));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(field("data")?)
        .map_err(|_| bad("its data is not base64"))?;
    if data.len() < 2 || data[0] != number {
        return Err(bad("its data does not belong to its number"));
    }
    Ok(Share {
        set: field("set")?,
        number,
        threshold,
        shares,
        recipient: field("recipient")?,
        data,
    })
}

/// What [`combine`] rebuilt, and which shares it left out and why (damaged data, or a header
/// line altered), so the operator can replace them.
pub struct Combined {
    /// The identity file text.
    pub identity: Zeroizing<String>,
    /// Shares not used: (name, why).
    pub left_out: Vec<(String, String)>,
}

impl std::fmt::Debug for Combined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the identity.
        f.debug_struct("Combined")
            .field("left_out", &self.left_out)
            .finish_non_exhaustive()
    }
}

/// Most subsets of K shares tried to find K good ones among more than K given.
const MAX_TRIES: usize = 20_000;

/// The identity `data` (K share byte strings) rebuild, if it is the identity for `recipient`.
fn rebuild(data: &[&[u8]], recipient: &str) -> Option<Zeroizing<String>> {
    let raw: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(data.iter().map(|d| d.to_vec()).collect());
    let secret = Zeroizing::new(vsss_rs::Gf256::combine_bytes(raw.as_slice()).ok()?);
    let line = std::str::from_utf8(&secret).ok()?;
    let mut text = Zeroizing::new(String::with_capacity(line.len() + 200));
    text.push_str("# rebuilt by localkms recovery combine\n# public key: ");
    text.push_str(recipient);
    text.push('\n');
    text.push_str(line);
    text.push('\n');
    (super::sealing::recipient_of(&text).as_deref() == Some(recipient)).then_some(text)
}

/// The next K-subset of 0..n after `idx` in lexicographic order, in place; false at the end.
fn next_subset(idx: &mut [usize], n: usize) -> bool {
    let k = idx.len();
    for i in (0..k).rev() {
        if idx[i] < n - k + i {
            idx[i] += 1;
            for j in i + 1..k {
                idx[j] = idx[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

/// Rebuilds the identity file text from `shares` (name, share): they must come from one
/// split (set id), and any K good ones among them are enough. A share whose header lines
/// (threshold, shares, recipient) disagree with the rest of its set was altered, and one whose
/// data does not fit the others is damaged: both are left out and named in
/// [`Combined::left_out`].
pub fn combine(shares: &[(String, Share)]) -> Result<Combined, ShareError> {
    let Some((first_name, first)) = shares.first() else {
        return Err(ShareError::TooFew {
            have: 0,
            threshold: 2,
            shares: 2,
            more: 2,
        });
    };
    for (name, s) in shares {
        if s.set != first.set {
            return Err(ShareError::MixedSets {
                name: name.clone(),
                theirs: s.set.clone(),
                first: first_name.clone(),
                ours: first.set.clone(),
            });
        }
    }
    // What the set says of itself, by majority: a share saying otherwise was altered.
    let header = |s: &Share| (s.threshold, s.shares, s.recipient.clone());
    let mut votes: Vec<((u8, u8, String), usize)> = Vec::new();
    for (_, s) in shares {
        match votes.iter_mut().find(|(h, _)| *h == header(s)) {
            Some((_, n)) => *n += 1,
            None => votes.push((header(s), 1)),
        }
    }
    let (agreed, _) = votes
        .iter()
        .max_by_key(|(_, n)| *n)
        .cloned()
        .unwrap_or_else(|| (header(first), 1));
    let (k, n, recipient) = agreed;
    let mut left_out = Vec::new();
    let mut good: Vec<&(String, Share)> = Vec::new();
    for entry in shares {
        let (name, s) = entry;
        if header(s) != (k, n, recipient.clone()) {
            left_out.push((
                name.clone(),
                format!(
                    "altered: it says threshold {}, shares {}, recipient {}, but the other shares of set {} say threshold {k}, shares {n}, recipient {recipient}",
                    s.threshold, s.shares, s.recipient, s.set
                ),
            ));
            continue;
        }
        if good.iter().any(|(_, g)| g.number == s.number) {
            return Err(ShareError::Duplicate {
                name: name.clone(),
                number: s.number,
            });
        }
        good.push(entry);
    }
    let threshold = usize::from(k);
    if good.len() < threshold {
        if let Some((name, why)) = left_out.first() {
            return Err(ShareError::Malformed {
                name: name.clone(),
                why: format!(
                    "{why}; without it there are {} good share(s), and {threshold} are needed",
                    good.len()
                ),
            });
        }
        return Err(ShareError::TooFew {
            have: good.len(),
            threshold,
            shares: usize::from(n),
            more: threshold - good.len(),
        });
    }
    // K good shares: the first subset of K that rebuilds the identity the set names.
    let mut idx: Vec<usize> = (0..threshold).collect();
    let mut found = None;
    for _ in 0..MAX_TRIES {
        let data: Vec<&[u8]> = idx.iter().map(|&i| good[i].1.data.as_slice()).collect();
        if let Some(text) = rebuild(&data, &recipient) {
            found = Some(text);
            break;
        }
        if !next_subset(&mut idx, good.len()) {
            break;
        }
    }
    let Some(identity) = found else {
        return Err(ShareError::Mismatch { recipient });
    };
    // Every other share is checked against K-1 of the good ones: one that does not fit is
    // damaged, and named so it can be replaced.
    let base: Vec<&[u8]> = idx[1..]
        .iter()
        .map(|&i| good[i].1.data.as_slice())
        .collect();
    for (i, (name, s)) in good.iter().map(|e| (&e.0, &e.1)).enumerate() {
        if idx.contains(&i) {
            continue;
        }
        let mut data = base.clone();
        data.push(s.data.as_slice());
        if rebuild(&data, &recipient).is_none() {
            left_out.push((
                name.clone(),
                "damaged: its data does not fit the other shares".to_owned(),
            ));
        }
    }
    Ok(Combined { identity, left_out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A share file is typed or pasted by people: any text parses or is refused, and
        /// combining whatever parsed never panics.
        #[test]
        fn any_share_text_is_parsed_or_refused(text in "localkms recovery share v1\n(set|number|threshold|shares|recipient|data): [ -~]{0,60}\n{0,3}") {
            if let Ok(share) = parse("x", &text) {
                let _ = combine(&[("x".to_owned(), share)]);
            }
        }
    }

    fn parsed(texts: &[(u8, String)], pick: &[usize]) -> Vec<(String, Share)> {
        pick.iter()
            .map(|&i| {
                let name = format!("share-{}", texts[i].0);
                let share = parse(&name, &texts[i].1).expect("parse");
                (name, share)
            })
            .collect()
    }

    #[test]
    fn any_threshold_rebuilds_and_fewer_or_mixed_do_not() {
        let (identity, recipient) =
            super::super::sealing::generate_identity(time::OffsetDateTime::now_utc());
        let texts = split(&identity, 3, 5).expect("split");
        assert_eq!(texts.len(), 5);
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let rebuilt = combine(&parsed(&texts, &pick)).expect("combine");
            assert!(rebuilt.left_out.is_empty());
            assert_eq!(
                super::super::sealing::recipient_of(&rebuilt.identity).as_deref(),
                Some(recipient.as_str())
            );
        }
        let e = combine(&parsed(&texts, &[0, 1]))
            .expect_err("too few")
            .to_string();
        assert!(e.contains("needs 3 of 5") && e.contains("1 more"), "{e}");
        let e = combine(&parsed(&texts, &[0, 0, 1]))
            .expect_err("dup")
            .to_string();
        assert!(e.contains("again"), "{e}");

        let other = split(&identity, 3, 5).expect("split");
        let mut mixed = parsed(&texts, &[0, 1]);
        mixed.extend(parsed(&other, &[2]));
        let e = combine(&mixed).expect_err("mixed").to_string();
        assert!(e.contains("different splits"), "{e}");

        // K shares with one damaged: caught by the recipient check.
        let mut damaged = parsed(&texts, &[0, 1, 2]);
        damaged[2].1.data[5] ^= 0x55;
        assert!(matches!(
            combine(&damaged),
            Err(ShareError::Mismatch { .. })
        ));
        // K good shares and a damaged one, in any position: rebuilt, the damaged one named.
        for bad in 0..4 {
            let mut four = parsed(&texts, &[0, 1, 2, 3]);
            four[bad].1.data[3] ^= 0x01;
            let rebuilt = combine(&four).expect("3 good of 4");
            assert_eq!(
                super::super::sealing::recipient_of(&rebuilt.identity).as_deref(),
                Some(recipient.as_str())
            );
            assert_eq!(rebuilt.left_out.len(), 1, "bad {bad}");
            assert_eq!(rebuilt.left_out[0].0, four[bad].0);
            assert!(rebuilt.left_out[0].1.contains("damaged"));
        }
        // An altered threshold or recipient line is named as altered, not as another split.
        let mut altered = parsed(&texts, &[0, 1, 2, 3, 4]);
        altered[1].1.threshold = 2;
        altered[3].1.recipient = "age1forged".into();
        let rebuilt = combine(&altered).expect("3 good of 5");
        let named: Vec<&str> = rebuilt.left_out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(named, [altered[1].0.as_str(), altered[3].0.as_str()]);
        assert!(rebuilt
            .left_out
            .iter()
            .all(|(_, why)| why.contains("altered")));
        altered.truncate(4);
        let e = combine(&altered).expect_err("2 good of 4").to_string();
        assert!(
            e.contains("altered") && e.contains("2 good share(s)"),
            "{e}"
        );
        assert!(!e.contains("different splits"), "{e}");
    }

    #[test]
    fn bad_parameters_and_share_files_are_refused() {
        let (identity, _) =
            super::super::sealing::generate_identity(time::OffsetDateTime::now_utc());
        assert!(matches!(
            split(&identity, 1, 3),
            Err(ShareError::Params { .. })
        ));
        assert!(matches!(
            split(&identity, 4, 3),
            Err(ShareError::Params { .. })
        ));
        assert!(matches!(
            split("# nothing", 2, 3),
            Err(ShareError::NotOneIdentity)
        ));
        let texts = split(&identity, 2, 3).expect("split");
        assert!(parse("x", "hello").is_err());
        let broken = texts[0].1.replace("number: 1", "number: 9");
        assert!(parse("x", &broken).is_err());
    }
}
