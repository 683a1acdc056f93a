//! A manifest file's text cut into its documents without parsing it, so
//! that a file's next version parses only the documents that changed.
//!
//! Invariant: a split is exact or there is none. Each piece, parsed alone,
//! yields exactly the documents the whole text yields at that place, in
//! order; whatever the split does not model (a YAML directive or document
//! end marker, a byte-order mark, a line break other than `\n` and `\r\n`,
//! a JSON value that is not an object or an
//! array, unbalanced brackets) gives `None`, and the caller parses the whole
//! text as before. Both scans are one linear pass that keeps a counter and
//! a flag, whatever the nesting; a text of more than [`MAX_PIECES`]
//! documents is not split (nor are its documents kept apart), so that a
//! hostile file of millions of empty documents costs what it did, not a
//! record per document.

/// The most documents of a file that are split and kept apart: a 16 MiB
/// file of real objects holds a few tens of thousands.
pub(super) const MAX_PIECES: usize = 1 << 16;

/// The pieces of a YAML text: each line opening with `---` (then a space,
/// a tab or the line's end) starts one, and the text before the first such
/// line is one too unless it is only comments and blank lines (no document
/// in the whole text, but parsed alone, an empty stream reads as one empty
/// document). A document start marker at the first column always starts a
/// document, in a block scalar or a quoted one alike (where the parser
/// calls it an error, it does so piece by piece as well).
pub(super) fn yaml(text: &str) -> Option<Vec<&str>> {
    // Lines are cut at `\n`: a text that libyaml also breaks elsewhere (a
    // lone `\r`, NEL, LS, PS) could hide a document marker or a document
    // in what looks like a comment line here.
    if text.contains('\u{feff}') || super::other_line_breaks(text) {
        return None;
    }
    let mut pieces = Vec::new();
    let (mut start, mut at) = (0, 0);
    for line in text.split_inclusive('\n') {
        let bytes = line.as_bytes();
        // A directive belongs to the document after it; `...` ends one:
        // rare in manifests, and not worth modelling.
        if bytes.first() == Some(&b'%') || marker(bytes, b"...") {
            return None;
        }
        if at > start && marker(bytes, b"---") {
            if pieces.len() == MAX_PIECES {
                return None;
            }
            pieces.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    if pieces.len() == MAX_PIECES {
        return None;
    }
    pieces.push(&text[start..]);
    if pieces.len() > 1 && pieces[0].lines().all(blank) {
        pieces.remove(0);
    }
    Some(pieces)
}

/// A line with nothing but spaces and perhaps a comment.
fn blank(line: &str) -> bool {
    let line = line.trim_start_matches(' ').trim_end_matches('\r');
    line.is_empty() || line.starts_with('#')
}

fn marker(line: &[u8], marker: &[u8; 3]) -> bool {
    line.starts_with(marker) && line.get(3).is_none_or(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// The pieces of a JSON text of concatenated objects (or arrays): each
/// from the bracket that opens its outermost one to the bracket that closes
/// it (whitespace between them, which means nothing, is in none). Brackets
/// in strings, escaped quotes included, do not count.
pub(super) fn json(text: &str) -> Option<Vec<&str>> {
    let mut pieces = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    let (mut in_string, mut escaped) = (false, false);
    for (i, &b) in text.as_bytes().iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'{' | b'[' => {
                if depth == 0 {
                    start = i;
                }
                depth += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    if pieces.len() == MAX_PIECES {
                        return None;
                    }
                    pieces.push(&text[start..=i]);
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {}
            // A document that is a scalar, or anything else between them.
            _ if depth == 0 => return None,
            b'"' => in_string = true,
            _ => {}
        }
    }
    (depth == 0 && !in_string).then_some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_pieces_start_at_document_markers_only() {
        let text = "# head\na: 1\n---\nb: |\n  --- not a marker\n---x: 2\n--- {c: 3}\n---\r\n---";
        assert_eq!(
            yaml(text).expect("splits"),
            ["# head\na: 1\n", "---\nb: |\n  --- not a marker\n---x: 2\n", "--- {c: 3}\n", "---\r\n", "---"]
        );
        assert_eq!(yaml("---\na: 1\n").expect("splits"), ["---\na: 1\n"]);
        assert_eq!(yaml("").expect("splits"), [""]);
        assert_eq!(
            yaml("# only\n\n  # comments\n# here").expect("splits"),
            ["# only\n\n  # comments\n# here"]
        );
        assert_eq!(yaml("# head\n\n---\na: 1\n").expect("splits"), ["---\na: 1\n"], "no document before");
    }

    #[test]
    fn yaml_with_directives_or_end_markers_is_not_split() {
        assert_eq!(yaml("%YAML 1.2\n---\na: 1\n"), None);
        assert_eq!(yaml("a: 1\n...\n---\nb: 2\n"), None);
        assert_eq!(yaml("\u{feff}a: 1\n"), None);
        assert_eq!(yaml(&"---\n".repeat(MAX_PIECES)).map(|p| p.len()), Some(MAX_PIECES));
        assert!(yaml(&"---\n".repeat(MAX_PIECES + 1)).is_none(), "too many documents to keep apart");
        assert_eq!(json(&"{}".repeat(MAX_PIECES)).map(|p| p.len()), Some(MAX_PIECES));
        assert!(json(&"{}".repeat(MAX_PIECES + 1)).is_none());
    }

    #[test]
    fn json_pieces_end_where_the_outermost_bracket_closes() {
        let text = r#" {"a": "}{\"]"} [1, {"b": []}]{"c": "\\"}
"#;
        assert_eq!(json(text).expect("splits"), [r#"{"a": "}{\"]"}"#, r#"[1, {"b": []}]"#, r#"{"c": "\\"}"#]);
    }

    #[test]
    fn json_that_is_not_objects_or_arrays_is_not_split() {
        for text in ["{} 7", r#""s""#, "{", "{}}", r#"{"a": "}"#, "{} x", "null"] {
            assert_eq!(json(text), None, "{text}");
        }
    }
}
