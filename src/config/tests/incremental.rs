//! `parse_changed` against `parse_str`: a file's next version, parsed
//! reusing the documents of the previous one, reads exactly as the same
//! text parsed whole (objects and their origins, warnings, errors).

use crate::config::{Documents, Manifests, parse_changed, parse_str};

fn service(name: &str, port: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n"
    )
}

/// The YAML documents the random files are made of: valid and invalid
/// objects, Lists, Endpoints of two subsets, other kinds, unknown fields,
/// empty documents, comments, block scalars holding `---`, and now and
/// then a syntax error.
fn yaml_document(pick: u64, n: u64) -> String {
    match pick {
        0..=3 => service(&format!("s{n}"), 80 + n as u32),
        4 => service(&format!("s{n}"), 70000),
        5 | 6 => format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{n}-1, labels: {{kubernetes.io/service-name: s{n}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.1.0.{n}]}}]\n"
        ),
        7 => {
            format!("apiVersion: v1\nkind: List\nitems:\n- {}- {}", indent(&service(&format!("l{n}"), 81)), {
                indent(&service(&format!("m{n}"), 82))
            })
        }
        8 => format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: e{n}}}\nsubsets:\n\
             - {{addresses: [{{ip: 10.2.0.1}}], ports: [{{port: 8080, name: a}}]}}\n\
             - {{addresses: [{{ip: 10.2.0.{n}}}], ports: [{{port: 9090, name: b}}]}}\n"
        ),
        9 => format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{n}}}\n"),
        10 => format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: u{n}\n  annotations:\n    note: |\n      \
             --- not a marker {n}\nspec: {{ports: [{{port: 80, targetPrt: 8080}}]}}\n"
        ),
        11 => String::new(),
        12 => format!("# a comment {n}\n"),
        13 => "- just\n- a list\n".to_owned(),
        14 => "apiVersion: v1\nkind: Service\nmetadata: {name: x\n".to_owned(),
        _ => format!(
            "--- {{apiVersion: v1, kind: Service, metadata: {{name: f{n}}}, spec: {{ports: [{{port: 83}}]}}}}\n"
        ),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| if i == 0 { format!("{l}\n") } else { format!("  {l}\n") })
        .collect()
}

fn json_document(pick: u64, n: u64) -> String {
    match pick {
        0..=4 => format!(
            r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "j{n}", "annotations": {{"a": "}}{{\"]["}}}},
 "spec": {{"ports": [{{"port": {}}}]}}}}"#,
            80 + n
        ),
        5 => format!(
            r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "j{n}"}}, "spec": {{"ports": [{{"port": 70000}}]}}}}"#
        ),
        6 | 7 => format!(
            r#"{{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {{"name": "j{n}-1",
 "labels": {{"kubernetes.io/service-name": "j{n}"}}}}, "addressType": "IPv4", "ports": [{{"port": 8080}}],
 "endpoints": [{{"addresses": ["10.1.0.{n}"]}}]}}"#
        ),
        8 => format!(
            r#"{{"apiVersion": "v1", "kind": "List", "items": [{{"apiVersion": "v1", "kind": "Service",
 "metadata": {{"name": "k{n}"}}, "spec": {{"ports": [{{"port": 81}}]}}}}]}}"#
        ),
        9 => "[1, 2]".to_owned(),
        10 => format!(r#"{{"apiVersion": "v1", "kind": "Secret", "metadata": {{"name": "x{n}"}}}}"#),
        11 => r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "#.to_owned(),
        12 => "7".to_owned(),
        _ => format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"c{n}"}},"spec":{{"ports":[{{"port":84}}]}}}}"#
        ),
    }
}

/// One file's text from its documents.
fn yaml_text(documents: &[String], lead: u64) -> String {
    let head = match lead {
        0 => "",
        1 => "---\n",
        _ => "# head\n",
    };
    format!("{head}{}", documents.join("---\n"))
}

fn json_text(documents: &[String], lead: u64) -> String {
    documents.join(["\n", "", " \n\t"][lead as usize % 3])
}

/// What a parse says, to compare: the objects and warnings, or the errors.
fn outcome(result: &Result<Manifests, String>) -> String {
    match result {
        Ok(m) => format!("{:?}\n{:?}\n{:?}", m.services, m.slices, m.warnings),
        Err(errors) => errors.clone(),
    }
}

#[test]
fn a_file_parsed_in_part_reads_as_parsed_whole_under_random_edits() {
    let mut next = crate::test_rng::xorshift(0x5bd1_e995);
    for (file, json) in [("t.yaml", false), ("t.json", true)] {
        let mut documents: Vec<(bool, String)> = Vec::new();
        let mut before: Option<(Manifests, Documents)> = None;
        let (mut parsed, mut total, mut reused_steps) = (0, 0, 0);
        let invalid: &[u64] = if json { &[5, 9, 11, 12] } else { &[4, 13, 14] };
        for step in 0..300 {
            // Invalid documents now and then, or no file would ever parse.
            let document = |next: &mut dyn FnMut(u64) -> u64| {
                let pick = if next(10) == 0 {
                    invalid[next(invalid.len() as u64) as usize]
                } else {
                    std::iter::repeat_with(|| next(16)).find(|p| !invalid.contains(p)).unwrap_or(0)
                };
                let text = if json { json_document(pick, next(40)) } else { yaml_document(pick, next(40)) };
                (!invalid.contains(&pick), text)
            };
            let bad = documents.iter().position(|(valid, _)| !valid);
            match next(6) {
                _ if bad.is_some() && next(2) == 0 => drop(documents.remove(bad.unwrap_or_default())),
                0 if !documents.is_empty() => {
                    let at = next(documents.len() as u64) as usize;
                    documents.remove(at);
                }
                1 | 2 => {
                    let new = document(&mut next);
                    let at = next(documents.len() as u64 + 1) as usize;
                    documents.insert(at, new);
                }
                _ if !documents.is_empty() => {
                    let new = document(&mut next);
                    let at = next(documents.len() as u64) as usize;
                    documents[at] = new;
                }
                _ => documents.push(document(&mut next)),
            }
            let documents: Vec<String> = documents.iter().map(|(_, text)| text.clone()).collect();
            let lead = next(3);
            let text = if json { json_text(&documents, lead) } else { yaml_text(&documents, lead) };
            let whole = parse_str(&text, file).map_err(|e| e.to_string());
            let part = parse_changed(&text, file, before.as_ref().map(|(m, d)| (m, d)));
            let result = part.result.map_err(|e| e.to_string());
            assert_eq!(
                outcome(&result.as_ref().map(|(m, _)| m.clone()).map_err(Clone::clone)),
                outcome(&whole),
                "step {step} of {file}:\n{text}"
            );
            if result.is_ok() {
                parsed += part.parsed;
                total += documents.len();
                reused_steps += usize::from(part.parsed < documents.len());
            }
            if let Ok(done) = result {
                // Now and then from a parse of the whole text (a first
                // load's), which notes its documents in one pass.
                let whole = || parse_changed(&text, file, None).result.expect("parsed before");
                before = Some(if next(4) == 0 { whole() } else { done });
            }
        }
        assert!(reused_steps > 50, "{file}: documents were reused in {reused_steps} steps only");
        assert!(parsed < total * 2 / 3, "{file}: {parsed} of {total} documents parsed");
    }
}

#[test]
fn one_changed_document_of_many_is_the_only_one_parsed_and_a_moved_one_is_parsed_again() {
    let documents: Vec<String> = (0..50).map(|i| service(&format!("s{i}"), 80)).collect();
    let first = parse_changed(&documents.join("---\n"), "t.yaml", None);
    assert_eq!(first.parsed, 50);
    let (m, d) = first.result.unwrap();

    let mut changed = documents.clone();
    changed[7] = service("s7", 81);
    let text = changed.join("---\n");
    let next = parse_changed(&text, "t.yaml", Some((&m, &d)));
    assert_eq!(next.parsed, 1, "only the changed document");
    let (n, _) = next.result.unwrap();
    assert_eq!(n.services, parse_str(&text, "t.yaml").unwrap().services);
    assert!(std::sync::Arc::ptr_eq(&n.services[8], &m.services[8]), "the others are shared");

    // A document inserted first: every later one has another index, so it
    // is parsed again, and its origin names its new index.
    let mut moved = documents.clone();
    moved.insert(0, service("new", 80));
    let next = parse_changed(&moved.join("---\n"), "t.yaml", Some((&m, &d)));
    assert_eq!(next.parsed, 51);
    let (n, _) = next.result.unwrap();
    assert_eq!(n.services[1].origin.to_string(), "t.yaml (document 2)");
}

/// Line breaks libyaml reads and a split on `\n` does not (a lone `\r`,
/// NEL, LS, PS): a document behind one must not be taken for a comment
/// line and dropped, nor shift the indexes after it.
#[test]
fn a_text_broken_by_other_line_breaks_reads_as_parsed_whole() {
    let first = parse_changed(&service("a", 80), "t.yaml", None).result.unwrap();
    let before = Some((&first.0, &first.1));
    let one = service("b", 81).replace('\n', "\r");
    for text in [
        format!("# a\r{one}---\n{}", service("c", 82)),
        format!("  \r  \n---\n{}", service("c", 82)),
        format!("# a\u{85}{}---\n{}", service("b", 81), service("c", 82)),
        format!("# a\u{2028}{}---\n{}", service("b", 81), service("c", 82)),
    ] {
        let whole = parse_str(&text, "t.yaml").map_err(|e| e.to_string());
        let part = parse_changed(&text, "t.yaml", before).result.map(|(m, _)| m).map_err(|e| e.to_string());
        assert_eq!(outcome(&part), outcome(&whole), "{text:?}");
    }
}
