//! A file's next version parsed in part: the documents whose text and
//! index are those of the version before lend their objects (module header
//! of `load`); a first parse notes where each document went.

use super::{Collector, ConfigErrors, Manifests, hash_text, split, too_deep};

/// Where each document of a parsed file went in its [`Manifests`], for
/// [`parse_changed`] to reuse.
#[derive(Clone, Debug, Default)]
pub struct Documents(Vec<Piece>);

/// One piece of a file's text (see `split`) that held documents: its
/// hash, its first document's index, how many it held, and the ends of what
/// it made in the file's lists (the previous piece's ends are its starts).
/// Small: one per document of every file served.
#[derive(Clone, Copy, Debug)]
struct Piece {
    hash: u64,
    first: u32,
    documents: u32,
    services: u32,
    slices: u32,
    warnings: u32,
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
        let mut documents = Vec::with_capacity(pieces.len());
        let mut cursor = 0;
        let mut first = 1;
        for piece in pieces {
            let hash = hash_text(piece);
            let reused = before.and_then(|(m, d)| self.reuse(m, &d.0, &mut cursor, first, hash));
            let count = match reused {
                Some(count) => count,
                None if json => self.json_documents(piece, file, first)?,
                None => self.yaml_documents(piece, file, first)?,
            };
            if count > 0 {
                let m = &self.manifests;
                let end = |n: usize| u32::try_from(n).ok();
                documents.push(Piece {
                    hash,
                    first: end(first)?,
                    documents: end(count)?,
                    services: end(m.services.len())?,
                    slices: end(m.slices.len())?,
                    warnings: end(m.warnings.len())?,
                });
            }
            first += count;
        }
        Some(Documents(documents))
    }

    /// Where each document of a text parsed whole (with `ends` noted) went,
    /// when the text splits into exactly one piece per document.
    fn documents_of(&self, text: &str, file: &str) -> Option<Documents> {
        let ends = self.ends.as_ref().filter(|_| self.errors.is_empty())?;
        let pieces = if file.ends_with(".json") { split::json(text)? } else { split::yaml(text)? };
        if pieces.len() != ends.len() {
            return None;
        }
        let mut documents = Vec::with_capacity(pieces.len());
        for (i, (piece, end)) in pieces.into_iter().zip(ends).enumerate() {
            let at = |n: usize| u32::try_from(n).ok();
            documents.push(Piece {
                hash: hash_text(piece),
                first: at(i + 1)?,
                documents: 1,
                services: at(end[0])?,
                slices: at(end[1])?,
                warnings: at(end[2])?,
            });
        }
        Some(Documents(documents))
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

    /// Takes the objects and warnings of the piece of `pieces` (from
    /// `cursor` on) whose first document and hash are these, if there is
    /// one; how many documents it held.
    fn reuse(
        &mut self,
        before: &Manifests,
        pieces: &[Piece],
        cursor: &mut usize,
        first: usize,
        hash: u64,
    ) -> Option<usize> {
        while pieces.get(*cursor).is_some_and(|p| (p.first as usize) < first) {
            *cursor += 1;
        }
        let piece = pieces.get(*cursor).filter(|p| p.first as usize == first && p.hash == hash)?;
        let (s, l, w) = match cursor.checked_sub(1).map(|i| pieces[i]) {
            Some(p) => (p.services as usize, p.slices as usize, p.warnings as usize),
            None => (0, 0, 0),
        };
        let services = before.services.get(s..piece.services as usize)?;
        let slices = before.slices.get(l..piece.slices as usize)?;
        let warnings = before.warnings.get(w..piece.warnings as usize)?;
        self.manifests.services.extend_from_slice(services);
        self.manifests.slices.extend_from_slice(slices);
        self.manifests.warnings.extend_from_slice(warnings);
        Some(piece.documents as usize)
    }
}
