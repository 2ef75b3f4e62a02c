//! Incremental detokenization.

use super::Tokenizer;

/// Turns token ids into text one id at a time. Only complete UTF-8 is returned: the bytes of
/// a character split across tokens are held until it completes. Invalid sequences become
/// U+FFFD exactly as in [`Tokenizer::decode`], so the concatenation of every `push` and the
/// final `flush` equals `decode` of all ids.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
    /// Nothing has been emitted or held yet (for dropping a SentencePiece leading space).
    at_start: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> Self {
        StreamDecoder {
            tok,
            skip_special,
            pending: Vec::new(),
            at_start: true,
        }
    }

    /// Adds one token; returns the text that is now complete (possibly empty). An id outside
    /// the vocabulary contributes nothing.
    pub fn push(&mut self, id: u32) -> String {
        let piece = self
            .tok
            .piece_for_decode(id, self.skip_special)
            .unwrap_or(&[]);
        let mut piece = piece;
        if self.at_start && !piece.is_empty() {
            if self.tok.strip_leading_space && piece[0] == b' ' {
                piece = &piece[1..];
            }
            self.at_start = false;
        }
        self.pending.extend_from_slice(piece);
        self.take_complete()
    }

    /// Returns everything still held, with incomplete sequences as U+FFFD.
    pub fn flush(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // This range was just validated, so the conversion copies it unchanged.
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + n;
                        }
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}
