//! Cutting text at special tokens before the model sees it.
//!
//! Candidates are control, unknown and user-defined tokens with non-empty text. Matching
//! gives priority to longer tokens (then lower ids, then earlier positions): a token's
//! occurrence is taken unless it overlaps one already taken. This is the same result as
//! scanning the text once per token, longest token first.

use std::ops::Range;

use super::{TokenEntry, TokenType};

/// A piece of the input: plain text (a byte range into it) or a special token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

#[derive(Debug, Default)]
struct Node {
    /// Children sorted by byte.
    children: Vec<(u8, u32)>,
    token: Option<u32>,
}

/// A byte trie over the special tokens' texts.
#[derive(Debug)]
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
}

impl SpecialMatcher {
    pub(crate) fn new(tokens: &[TokenEntry]) -> SpecialMatcher {
        let mut nodes = vec![Node::default()];
        for (id, t) in tokens.iter().enumerate() {
            if t.text.is_empty()
                || !matches!(
                    t.kind,
                    TokenType::Control | TokenType::Unknown | TokenType::UserDefined
                )
            {
                continue;
            }
            let mut cur = 0usize;
            for &b in t.text.as_bytes() {
                cur = match nodes[cur].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => nodes[cur].children[i].1 as usize,
                    Err(i) => {
                        let next = nodes.len();
                        nodes.push(Node::default());
                        nodes[cur].children.insert(i, (b, next as u32));
                        next
                    }
                };
            }
            // Duplicate texts: the lowest id wins.
            nodes[cur].token.get_or_insert(id as u32);
        }
        SpecialMatcher { nodes }
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let ch = &self.nodes[node].children;
        ch.binary_search_by_key(&b, |c| c.0).ok().map(|i| ch[i].1 as usize)
    }

    /// Splits `text` into plain-text ranges and special tokens. User-defined tokens always
    /// match; control and unknown tokens only with `parse_special`.
    pub(crate) fn partition(
        &self,
        text: &str,
        tokens: &[TokenEntry],
        parse_special: bool,
    ) -> Vec<Fragment> {
        if self.nodes[0].children.is_empty() || text.is_empty() {
            return if text.is_empty() { Vec::new() } else { vec![Fragment::Text(0..text.len())] };
        }
        let bytes = text.as_bytes();
        // (length, id, start)
        let mut cands: Vec<(usize, u32, usize)> = Vec::new();
        for start in 0..bytes.len() {
            let mut node = 0usize;
            let mut i = start;
            while i < bytes.len() {
                match self.child(node, bytes[i]) {
                    Some(n) => node = n,
                    None => break,
                }
                i += 1;
                if let Some(id) = self.nodes[node].token {
                    let kind = tokens[id as usize].kind;
                    if parse_special || kind == TokenType::UserDefined {
                        cands.push((i - start, id, start));
                    }
                }
            }
        }
        if cands.is_empty() {
            return vec![Fragment::Text(0..text.len())];
        }
        cands.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut taken = vec![false; bytes.len()];
        let mut chosen: Vec<(usize, usize, u32)> = Vec::new();
        for (len, id, start) in cands {
            if taken[start..start + len].iter().any(|&t| t) {
                continue;
            }
            taken[start..start + len].iter_mut().for_each(|t| *t = true);
            chosen.push((start, len, id));
        }
        chosen.sort_unstable();
        let mut out = Vec::with_capacity(chosen.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in chosen {
            if start > pos {
                out.push(Fragment::Text(pos..start));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < bytes.len() {
            out.push(Fragment::Text(pos..bytes.len()));
        }
        out
    }
}
