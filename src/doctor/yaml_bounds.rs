//! A bound on the work a YAML file can make `doctor` do, checked before the file is loaded.
//!
//! A YAML loader expands aliases by copying the anchored node, so a kilobyte of nested
//! aliases (an "alias bomb") becomes gigabytes. This walks the parser's events once, keeping
//! only the expanded size of each anchored node, and refuses a file whose expansion would pass
//! [`MAX_NODES`]: nothing is ever expanded.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

/// More YAML nodes than any encryption configuration or apiserver manifest has, by far.
pub(super) const MAX_NODES: usize = 100_000;

/// Whether `text`, fully expanded, stays within [`MAX_NODES`]; the reason when it does not
/// (or when it does not parse).
pub(super) fn check(text: &str) -> Result<(), String> {
    let mut parser = Parser::new_from_str(text);
    let mut total: usize = 0;
    // Expanded size of each anchored node, by anchor id.
    let mut sizes: HashMap<usize, usize> = HashMap::new();
    // Open collections: their anchor id and the total when they opened.
    let mut open: Vec<(usize, usize)> = Vec::new();
    loop {
        let (event, _) = parser
            .next_token()
            .map_err(|e| format!("it is not valid YAML: {e}"))?;
        match event {
            Event::StreamEnd => return Ok(()),
            Event::Scalar(_, _, anchor, _) => {
                total = total.saturating_add(1);
                if anchor > 0 {
                    sizes.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                total = total.saturating_add(1);
                open.push((anchor, total));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = open.pop() {
                    if anchor > 0 {
                        sizes.insert(anchor, total - start + 1);
                    }
                }
            }
            Event::Alias(id) => {
                total = total.saturating_add(sizes.get(&id).copied().unwrap_or(1));
            }
            _ => {}
        }
        if total > MAX_NODES {
            return Err(format!(
                "it expands to more than {MAX_NODES} YAML nodes (nested aliases: an alias bomb?); refusing to load it"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alias_bomb_is_refused_without_expanding_it() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (i, prev) in ('b'..='k').zip('a'..='j') {
            bomb.push_str(&format!(
                "{i}: &{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        assert!(bomb.len() < 2048, "a small file");
        let err = check(&bomb).expect_err("refused");
        assert!(err.contains("alias bomb"), "{err}");
    }

    #[test]
    fn ordinary_files_and_modest_aliases_pass() {
        check("kind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n")
            .expect("plain");
        check("base: &b {name: x, image: y}\nc1: *b\nc2: *b\n").expect("small aliases");
        assert!(check("a: [\n").is_err());
    }
}
