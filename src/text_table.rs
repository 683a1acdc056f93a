//! The plain-text tables the CLI prints (`ringport check`, `ringport
//! status`): columns padded to their widest cell, nothing else.

use std::fmt::Write;

/// Columns padded to their widest cell, two spaces apart; the last one is
/// not padded (it may be long). `check` and `status` print
/// through this.
pub fn render<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| if i + 1 == N { cell.clone() } else { format!("{cell:w$}") })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_padded_to_the_widest_cell_but_the_last() {
        let rows = [["a".to_owned(), "long cell".to_owned(), "x".to_owned()]];
        assert_eq!(super::render(["H1", "H2", "LAST"], &rows), "H1  H2         LAST\na   long cell  x\n");
    }
}
