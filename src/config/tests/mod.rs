//! Unit tests of `config`, one file per file under test. They live beside
//! the code rather than inside it only to keep every file under ~600 lines;
//! they drive the public API with small YAML documents, read as `t.yaml`.
#![allow(clippy::unwrap_used, clippy::panic)]

mod errors;
mod incremental;
mod join;
mod load;
mod service;
mod slice;

use crate::config::{Manifests, parse_str};

/// The manifests of `text`, read as file `t.yaml`; panics on errors.
pub(crate) fn manifests(text: &str) -> Manifests {
    parse_str(text, "t.yaml").unwrap_or_else(|errors| panic!("unexpected errors:\n{errors}"))
}

/// The errors of `text`, read as file `t.yaml`, one per line.
pub(crate) fn errors(text: &str) -> String {
    match parse_str(text, "t.yaml") {
        Ok(manifests) => panic!("expected errors, got {manifests:#?}"),
        Err(errors) => errors.to_string(),
    }
}

/// Asserts one error line starts with `location` (origin, object and
/// field) and contains `problem`.
pub(crate) fn assert_error(text: &str, location: &str, problem: &str) {
    let errors = errors(text);
    assert!(
        errors.lines().any(|line| line.starts_with(location) && line.contains(problem)),
        "expected an error at `{location}` containing `{problem}`, got:\n{errors}"
    );
}
