//! The pre-tokenizer: split text into chunks ("pieces") with a regex pattern.
//!
//! GPT-4's pattern and nanochat's variant of it (`\p{N}{1,2}` instead of `\p{N}{1,3}`) are matched by a
//! hand-written scanner, several times faster than fancy-regex's backtracking VM; any other pattern goes
//! through fancy-regex. The scanner's character classes (\p{L}, \p{N}, \s and the case folds of the
//! contraction letters) come from regex-syntax, the parser fancy-regex itself uses, so both agree on
//! every code point (tests check this exhaustively against fancy-regex).

use std::sync::OnceLock;

use fancy_regex::Regex;
use regex_syntax::hir::{Class, HirKind};

pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// nanochat's split pattern: GPT-4's, with `\p{N}{1,2}` instead of `\p{N}{1,3}`.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// Character class bits. A char with none of them is "punctuation" ([^\s\p{L}\p{N}]).
const LETTER: u8 = 1; // \p{L}
const NUMBER: u8 = 2; // \p{N}
const SPACE: u8 = 4; // \s (Unicode White_Space)
const NEWLINE: u8 = 8; // \r or \n (always with SPACE)
const END: u8 = 16; // past the end of the text: matches no class
const CONTRACTION_LETTERS: &str = "sdmtlver";

/// Class bits of every code point in a two-level table (blocks of 256 code points, shared when equal).
struct Classes {
    ascii: [u8; 128],
    block_of: Vec<u16>,
    blocks: Vec<[u8; 256]>,
    /// `folds[i]`: the chars that `(?i:x)` matches for x = CONTRACTION_LETTERS[i].
    folds: Vec<Vec<char>>,
}

fn class_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("built-in class pattern parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        HirKind::Literal(lit) => {
            let c = std::str::from_utf8(&lit.0)
                .expect("utf-8 literal")
                .chars()
                .next()
                .unwrap() as u32;
            vec![(c, c)]
        }
        other => panic!("unexpected HIR for {pattern}: {other:?}"),
    }
}

impl Classes {
    fn build() -> Self {
        let mut flat = vec![0u8; 0x110000];
        for (pattern, bit) in [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\s", SPACE),
            (r"[\r\n]", NEWLINE),
        ] {
            for (lo, hi) in class_ranges(pattern) {
                for cp in lo..=hi {
                    flat[cp as usize] |= bit;
                }
            }
        }
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut index: ahash::AHashMap<[u8; 256], u16> = ahash::AHashMap::new();
        let block_of: Vec<u16> = flat
            .chunks_exact(256)
            .map(|chunk| {
                let block: [u8; 256] = chunk.try_into().unwrap();
                *index.entry(block).or_insert_with(|| {
                    blocks.push(block);
                    (blocks.len() - 1) as u16
                })
            })
            .collect();
        let folds = CONTRACTION_LETTERS
            .chars()
            .map(|x| {
                class_ranges(&format!("(?i:{x})"))
                    .into_iter()
                    .flat_map(|(lo, hi)| (lo..=hi).filter_map(char::from_u32))
                    .collect()
            })
            .collect();
        let ascii = std::array::from_fn(|i| flat[i]);
        Self {
            ascii,
            block_of,
            blocks,
            folds,
        }
    }

    fn get() -> &'static Self {
        static CLASSES: OnceLock<Classes> = OnceLock::new();
        CLASSES.get_or_init(Self::build)
    }

    #[inline(always)]
    fn of(&self, cp: u32) -> u8 {
        self.blocks[self.block_of[(cp >> 8) as usize] as usize][(cp & 0xff) as usize]
    }

    fn folds_to(&self, c: char, letter: char) -> bool {
        let i = CONTRACTION_LETTERS
            .find(letter)
            .expect("a contraction letter");
        self.folds[i].contains(&c)
    }
}

/// Splits text into pieces exactly as fancy-regex's `find_iter` would with the same pattern.
pub struct Splitter {
    pattern: String,
    regex: Regex,
    /// `Some(max_digits)` when the pattern is GPT-4's (3) or nanochat's (2): use the scanner.
    fast: Option<usize>,
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        let regex =
            Regex::new(pattern).map_err(|e| format!("invalid regex pattern {pattern:?}: {e}"))?;
        let fast = match pattern {
            GPT4_PATTERN => Some(3),
            NANOCHAT_PATTERN => Some(2),
            _ => None,
        };
        if fast.is_some() {
            Classes::get();
        }
        Ok(Self {
            pattern: pattern.to_string(),
            regex,
            fast,
        })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Call `f` on every piece of `text`, in order.
    #[inline]
    pub fn for_each<'t>(&self, text: &'t str, f: impl FnMut(&'t str)) -> Result<(), String> {
        match self.fast {
            Some(max_digits) => {
                scan(text, max_digits, Classes::get(), f);
                Ok(())
            }
            None => self.for_each_regex(text, f),
        }
    }

    /// The same split done by fancy-regex, whatever the pattern (the reference for the scanner).
    pub fn for_each_regex<'t>(
        &self,
        text: &'t str,
        mut f: impl FnMut(&'t str),
    ) -> Result<(), String> {
        for m in self.regex.find_iter(text) {
            f(m.map_err(|e| format!("regex split failed: {e}"))?.as_str());
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// the scanner

/// Decode the char starting at byte `i` of valid UTF-8: (code point, byte length).
#[inline(always)]
fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let b0 = b[i] as u32;
    if b0 < 0xE0 {
        ((b0 & 0x1F) << 6 | (b[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (
            (b0 & 0x0F) << 12 | (b[i + 1] as u32 & 0x3F) << 6 | (b[i + 2] as u32 & 0x3F),
            3,
        )
    } else {
        let cp = (b0 & 0x07) << 18 | (b[i + 1] as u32 & 0x3F) << 12 | (b[i + 2] as u32 & 0x3F) << 6;
        (cp | (b[i + 3] as u32 & 0x3F), 4)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    cls: &'a Classes,
}

impl Cursor<'_> {
    /// (class bits, byte length) of the char at byte `i`; (END, 0) at the end of the text.
    #[inline(always)]
    fn at(&self, i: usize) -> (u8, usize) {
        match self.b.get(i) {
            None => (END, 0),
            Some(&c) if c < 0x80 => (self.cls.ascii[c as usize], 1),
            Some(_) => {
                let (cp, n) = decode(self.b, i);
                (self.cls.of(cp), n)
            }
        }
    }

    fn char_at(&self, i: usize) -> Option<(char, usize)> {
        match *self.b.get(i)? {
            c if c < 0x80 => Some((c as char, 1)),
            _ => {
                let (cp, n) = decode(self.b, i);
                Some((char::from_u32(cp)?, n))
            }
        }
    }

    /// End of the run of chars (from byte `i`) whose class intersects `mask`.
    #[inline(always)]
    fn run(&self, mut i: usize, mask: u8) -> usize {
        loop {
            let (c, n) = self.at(i);
            if c & mask == 0 {
                return i;
            }
            i += n;
        }
    }

    /// End of the punctuation run from byte `i` (chars with no class bit).
    #[inline(always)]
    fn punct_run(&self, mut i: usize) -> usize {
        loop {
            let (c, n) = self.at(i);
            if c != 0 {
                return i;
            }
            i += n;
        }
    }

    /// `'(?i:[sdmt]|ll|ve|re)` after the apostrophe at byte `i - 1`: the byte length matched after it.
    fn contraction(&self, i: usize) -> Option<usize> {
        let (c1, n1) = self.char_at(i)?;
        if "sdmt".chars().any(|x| self.cls.folds_to(c1, x)) {
            return Some(n1);
        }
        let (c2, n2) = self.char_at(i + n1)?;
        let pairs = [('l', 'l'), ('v', 'e'), ('r', 'e')];
        pairs
            .iter()
            .any(|&(x, y)| self.cls.folds_to(c1, x) && self.cls.folds_to(c2, y))
            .then_some(n1 + n2)
    }

    /// End of the piece that starts at byte `p` (< text length). The branches follow the pattern's
    /// alternatives in order; the first that matches wins, as in a backtracking regex.
    #[inline(always)]
    fn piece_end(&self, p: usize, max_digits: usize) -> usize {
        let (c, n) = self.at(p);
        // '(?i:[sdmt]|ll|ve|re)
        if self.b[p] == b'\'' {
            if let Some(len) = self.contraction(p + 1) {
                return p + 1 + len;
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+
        if c & LETTER != 0 {
            return self.run(p + n, LETTER);
        }
        if c & (NEWLINE | NUMBER) == 0 && self.at(p + n).0 & LETTER != 0 {
            return self.run(p + n, LETTER);
        }
        // \p{N}{1,max_digits}
        if c & NUMBER != 0 {
            let mut end = p + n;
            for _ in 1..max_digits {
                let (c2, n2) = self.at(end);
                if c2 & NUMBER == 0 {
                    break;
                }
                end += n2;
            }
            return end;
        }
        //  ?[^\s\p{L}\p{N}]++[\r\n]*
        let punct_from = if c == 0 {
            Some(p)
        } else if self.b[p] == b' ' && self.at(p + 1).0 == 0 {
            Some(p + 1)
        } else {
            None
        };
        if let Some(start) = punct_from {
            let mut end = self.punct_run(start);
            while end < self.b.len() && (self.b[end] == b'\r' || self.b[end] == b'\n') {
                end += 1;
            }
            return end;
        }
        // c is whitespace: \s*[\r\n] | \s+(?!\S) | \s+
        let (mut q, mut last) = (p, p);
        let mut after_newline = None;
        loop {
            let (c2, n2) = self.at(q);
            if c2 & SPACE == 0 {
                break;
            }
            if c2 & NEWLINE != 0 {
                after_newline = Some(q + n2);
            }
            last = q;
            q += n2;
        }
        match after_newline {
            Some(end) => end,               // \s*[\r\n]: up to the run's last \r or \n
            None if q == self.b.len() => q, // \s+(?!\S) at the end of the text
            None if last > p => last,       // \s+(?!\S): all but the run's last char
            None => q,                      // \s+: a single space before a non-space
        }
    }
}

fn scan<'t>(text: &'t str, max_digits: usize, cls: &Classes, mut f: impl FnMut(&'t str)) {
    let cursor = Cursor {
        b: text.as_bytes(),
        cls,
    };
    let mut p = 0;
    while p < text.len() {
        let end = cursor.piece_end(p, max_digits);
        f(&text[p..end]);
        p = end;
    }
}

// ------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(splitter: &Splitter, text: &str, reference: bool) -> Vec<String> {
        let mut out = Vec::new();
        let push = |p: &str| out.push(p.to_string());
        if reference {
            splitter.for_each_regex(text, push).unwrap();
        } else {
            splitter.for_each(text, push).unwrap();
        }
        out
    }

    #[test]
    fn known_examples() {
        let s = Splitter::new(NANOCHAT_PATTERN).unwrap();
        let text = "Hello world's 12345 ,.!? \n\n  x\t\ty 'LL 'Ve ' ſ'ſ \u{3000}\u{3000}z";
        assert_eq!(pieces(&s, text, false), pieces(&s, text, true));
        assert_eq!(
            pieces(&s, "I'll pay 1234!!\n", false),
            vec!["I", "'ll", " pay", " ", "12", "34", "!!\n"]
        );
    }

    /// Every code point, in every context that distinguishes the pattern's branches, against fancy-regex.
    #[test]
    fn every_code_point_matches_fancy_regex() {
        let contexts = [
            "{}", "a{}b", " {}{}x", "'{}", "'{}e", "{}'s", "1{}22", " {}\n", "\n{}  ", "{} .",
            "x {}",
        ];
        for pattern in [NANOCHAT_PATTERN, GPT4_PATTERN] {
            let s = Splitter::new(pattern).unwrap();
            for context in contexts {
                // many code points per text keeps fancy-regex's per-call overhead down
                let mut batch = String::new();
                for cp in (0..0x110000u32).filter_map(char::from_u32) {
                    batch.push_str(&context.replace("{}", &cp.to_string()));
                    batch.push('\u{0}');
                    if batch.len() > 1 << 16 || cp == '\u{10FFFF}' {
                        assert_eq!(
                            pieces(&s, &batch, false),
                            pieces(&s, &batch, true),
                            "{context}"
                        );
                        batch.clear();
                    }
                }
            }
        }
    }
}
