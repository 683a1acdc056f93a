//! A file's next version parsed in part: the documents whose text and
//! index are those of the version before lend their objects (module header
//! of `load`); a first parse notes where each document went.

use std::iter::Peekable;
use std::ops::Range;

use super::{Collector, ConfigErrors, Manifests, hash_text, split, too_deep};

/// Where each document of a parsed file went in its [`Manifests`], for
/// [`parse_changed`] to reuse: per piece of its text (see `split`) that
/// held documents, the hash of the piece, and its [`Piece`] packed (see
/// [`Pieces::push`]). One per document of every file served, so small: 9
/// bytes for the usual piece (one document, at most one object and one
/// warning), where the plain record took 32.
#[derive(Clone, Debug, Default)]
pub struct Documents {
    hashes: Box<[u64]>,
    shapes: Box<[u8]>,
}

/// One piece of a file's text that held documents: its hash, its first
/// document's index, how many it held, and the ranges of what it made in
/// the file's lists.
#[derive(Clone, Debug, PartialEq)]
struct Piece {
    hash: u64,
    first: usize,
    documents: usize,
    services: Range<usize>,
    slices: Range<usize>,
    warnings: Range<usize>,
}

/// A [`Documents`] being written, piece after piece.
struct Pieces {
    hashes: Vec<u64>,
    shapes: Vec<u8>,
    /// The first document of a piece that follows the last without a gap.
    next: usize,
    /// The ends of what the pieces so far made (services, slices, warnings).
    ends: [usize; 3],
}

/// A shape byte that says the piece's numbers follow, as varints: the gap
/// before its first document, its documents, and what it made.
const WIDE: u8 = 0xff;

impl Pieces {
    fn with_capacity(pieces: usize) -> Self {
        Pieces {
            hashes: Vec::with_capacity(pieces),
            shapes: Vec::with_capacity(pieces),
            next: 1,
            ends: [0; 3],
        }
    }

    /// Notes a piece whose documents are `first..first + documents` and
    /// whose objects and warnings end at `ends` in the file's lists. A
    /// piece of one document right after the last one, that made at most
    /// one of each, is one byte (a bit each); any other, [`WIDE`] and its
    /// numbers. `None` if the pieces do not follow each other.
    fn push(&mut self, hash: u64, first: usize, documents: usize, ends: [usize; 3]) -> Option<()> {
        let gap = first.checked_sub(self.next)?;
        let mut made = [0; 3];
        for (made, (end, start)) in made.iter_mut().zip(ends.iter().zip(self.ends)) {
            *made = end.checked_sub(start)?;
        }
        if gap == 0 && documents == 1 && made.iter().all(|&n| n <= 1) {
            self.shapes.push((made[0] | made[1] << 1 | made[2] << 2) as u8);
        } else {
            self.shapes.push(WIDE);
            for n in [gap, documents, made[0], made[1], made[2]] {
                varint(&mut self.shapes, n);
            }
        }
        self.hashes.push(hash);
        (self.next, self.ends) = (first.checked_add(documents)?, ends);
        Some(())
    }

    fn finish(self) -> Documents {
        Documents { hashes: self.hashes.into_boxed_slice(), shapes: self.shapes.into_boxed_slice() }
    }
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The pieces of a [`Documents`], in order, unpacked.
struct Walk<'a> {
    hashes: std::slice::Iter<'a, u64>,
    shapes: &'a [u8],
    next: usize,
    ends: [usize; 3],
}

impl Documents {
    fn walk(&self) -> Walk<'_> {
        Walk { hashes: self.hashes.iter(), shapes: &self.shapes, next: 1, ends: [0; 3] }
    }
}

impl Walk<'_> {
    fn varint(&mut self) -> Option<usize> {
        let mut n: usize = 0;
        for shift in (0..usize::BITS).step_by(7) {
            let (&byte, rest) = self.shapes.split_first()?;
            self.shapes = rest;
            n |= usize::from(byte & 0x7f).checked_shl(shift)?;
            if byte < 0x80 {
                return Some(n);
            }
        }
        None
    }
}

impl Iterator for Walk<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        let hash = *self.hashes.next()?;
        let (&shape, rest) = self.shapes.split_first()?;
        self.shapes = rest;
        let (gap, documents, made) = if shape == WIDE {
            let gap = self.varint()?;
            let documents = self.varint()?;
            (gap, documents, [self.varint()?, self.varint()?, self.varint()?])
        } else {
            let bit = |i: u8| usize::from(shape >> i & 1);
            (0, 1, [bit(0), bit(1), bit(2)])
        };
        let first = self.next.checked_add(gap)?;
        let starts = self.ends;
        for (end, made) in self.ends.iter_mut().zip(made) {
            *end = end.checked_add(made)?;
        }
        self.next = first.checked_add(documents)?;
        Some(Piece {
            hash,
            first,
            documents,
            services: starts[0]..self.ends[0],
            slices: starts[1]..self.ends[1],
            warnings: starts[2]..self.ends[2],
        })
    }
}

/// What [`parse_changed`] made of a file: its objects and documents, or
/// every error; and how many documents it parsed (the others were reused).
#[derive(Debug)]
pub struct Parsed {
    pub result: Result<(Manifests, Documents), ConfigErrors>,
    pub parsed: usize,
}

/// Validates one file's text as [`parse_str`](super::parse_str) does,
/// with the same result, parsing only the documents that differ from
/// `before` (the same file's previous result): a document with the same
/// text at the same index reuses the objects and warnings it made then
/// (module header of `load`).
pub fn parse_changed(text: &str, file: &str, before: Option<(&Manifests, &Documents)>) -> Parsed {
    if before.is_some() {
        let mut collector = Collector::default();
        if let Some(documents) = collector.pieces(text, file, before) {
            let parsed = collector.parsed;
            return Parsed { result: collector.finish().map(|m| (m, documents)), parsed };
        }
    }
    // Nothing to reuse, or no exact split: the whole text in one pass (a
    // parser per piece would cost a first load of many small YAML
    // documents more), noting where each document's objects end.
    let mut collector = Collector { ends: Some(Vec::new()), ..Collector::default() };
    collector.file(text, file);
    let documents = collector.documents_of(text, file);
    let parsed = collector.parsed;
    Parsed { result: collector.finish().map(|m| (m, documents.unwrap_or_default())), parsed }
}

impl Collector {
    /// A file's text piece by piece, each piece's documents reused from
    /// `before` when its hash and first index are the same, parsed
    /// otherwise. `None` when the text is not cut exactly or a piece has a
    /// syntax error: the caller parses the whole text instead.
    fn pieces(
        &mut self,
        text: &str,
        file: &str,
        before: Option<(&Manifests, &Documents)>,
    ) -> Option<Documents> {
        let json = file.ends_with(".json");
        let pieces = if json {
            split::json(text)?
        } else if too_deep(text) {
            return None;
        } else {
            split::yaml(text)?
        };
        let mut documents = Pieces::with_capacity(pieces.len());
        let mut walk = before.map(|(m, d)| (m, d.walk().peekable()));
        let mut first = 1;
        for piece in pieces {
            let hash = hash_text(piece);
            let reused = walk.as_mut().and_then(|(m, walk)| self.reuse(m, walk, first, hash));
            let count = match reused {
                Some(count) => count,
                None if json => self.json_documents(piece, file, first)?,
                None => self.yaml_documents(piece, file, first)?,
            };
            if count > 0 {
                let m = &self.manifests;
                documents.push(hash, first, count, [m.services.len(), m.slices.len(), m.warnings.len()])?;
            }
            first += count;
        }
        Some(documents.finish())
    }

    /// Where each document of a text parsed whole (with `ends` noted) went,
    /// when the text splits into exactly one piece per document.
    fn documents_of(&self, text: &str, file: &str) -> Option<Documents> {
        let ends = self.ends.as_ref().filter(|_| self.errors.is_empty())?;
        let pieces = if file.ends_with(".json") { split::json(text)? } else { split::yaml(text)? };
        if pieces.len() != ends.len() {
            return None;
        }
        let mut documents = Pieces::with_capacity(pieces.len());
        for (i, (piece, end)) in pieces.into_iter().zip(ends).enumerate() {
            documents.push(hash_text(piece), i + 1, 1, *end)?;
        }
        Some(documents.finish())
    }

    /// Notes where the document just parsed ends, if asked to.
    pub(super) fn end_document(&mut self) {
        let m = &self.manifests;
        if let Some(ends) = &mut self.ends {
            ends.push([m.services.len(), m.slices.len(), m.warnings.len()]);
            if ends.len() > split::MAX_PIECES {
                self.ends = None;
            }
        }
    }

    /// Takes the objects and warnings of the next piece of `pieces` whose
    /// first document and hash are these, if there is one; how many
    /// documents it held.
    fn reuse(
        &mut self,
        before: &Manifests,
        pieces: &mut Peekable<Walk<'_>>,
        first: usize,
        hash: u64,
    ) -> Option<usize> {
        while pieces.next_if(|p| p.first < first).is_some() {}
        let piece = pieces.next_if(|p| p.first == first && p.hash == hash)?;
        let services = before.services.get(piece.services)?;
        let slices = before.slices.get(piece.slices)?;
        let warnings = before.warnings.get(piece.warnings)?;
        self.manifests.services.extend_from_slice(services);
        self.manifests.slices.extend_from_slice(slices);
        self.manifests.warnings.extend_from_slice(warnings);
        Some(piece.documents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_read_back_as_written_in_one_byte_or_wide() {
        // (first, documents, ends): one document of one object, of one
        // object and a warning, of nothing; a gap (empty documents), a List
        // of 300 objects, many documents, and numbers past a varint byte.
        let written = [
            (1, 1, [1, 0, 0]),
            (2, 1, [1, 1, 1]),
            (3, 1, [1, 1, 1]),
            (6, 1, [1, 2, 1]),
            (7, 1, [301, 2, 1]),
            (8, 200, [301, 3, 1]),
            (70_000, 1, [301, 3, 1 << 40]),
            (70_001, 1, [302, 3, 1 << 40]),
        ];
        let mut pieces = Pieces::with_capacity(written.len());
        for (i, &(first, documents, ends)) in written.iter().enumerate() {
            pieces.push(i as u64 * 7919, first, documents, ends).expect("in order");
        }
        let documents = pieces.finish();
        let read: Vec<Piece> = documents.walk().collect();
        let mut starts = [0; 3];
        for (i, (piece, &(first, count, ends))) in read.iter().zip(&written).enumerate() {
            let want = Piece {
                hash: i as u64 * 7919,
                first,
                documents: count,
                services: starts[0]..ends[0],
                slices: starts[1]..ends[1],
                warnings: starts[2]..ends[2],
            };
            assert_eq!(piece, &want, "piece {i}");
            starts = ends;
        }
        assert_eq!(read.len(), written.len());
        // Four pieces of one byte; the gap, the List, the 200 documents and
        // the gap with warnings past 2^40 are wide: a byte, then five
        // varints of one byte each but for 300, 200, 69_792 and 2^40 - 1.
        assert_eq!(documents.shapes.len(), 4 + 6 + 7 + 7 + (1 + 3 + 3 + 6));
    }

    #[test]
    fn pieces_out_of_order_or_shrinking_are_refused() {
        let mut pieces = Pieces::with_capacity(2);
        pieces.push(1, 3, 2, [1, 0, 0]).expect("a gap first is fine");
        assert_eq!(pieces.push(2, 4, 1, [2, 0, 0]), None, "overlaps the last piece");
        assert_eq!(pieces.push(2, 5, 1, [0, 0, 0]), None, "ends before the last one");
    }

    #[test]
    fn a_file_of_one_object_per_document_keeps_nine_bytes_a_document() {
        let text: String = (0..1000)
            .map(|i| {
                format!(
                    "{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"s{i}\"}}, \
                     \"spec\": {{\"ports\": [{{\"port\": 80}}]}}}}\n"
                )
            })
            .collect();
        let (manifests, documents) = parse_changed(&text, "t.json", None).result.expect("valid");
        assert_eq!(manifests.services.len(), 1000);
        assert_eq!(documents.hashes.len(), 1000);
        assert_eq!(size_of_val(&*documents.hashes) + size_of_val(&*documents.shapes), 9 * 1000);
        // And a reparse of the same text reuses them all.
        let again = parse_changed(&text, "t.json", Some((&manifests, &documents)));
        assert_eq!(again.parsed, 0);
        assert_eq!(again.result.expect("valid").1.shapes, documents.shapes);
    }
}
