//! Arbitrary text through the job-spec parser, as the REST API (`POST /v1/sort`, lenient) and the CLI
//! (`--spec`, strict) call it: JSON when the text starts with `{`, YAML otherwise. Errors are fine; a
//! panic, a hang or an oversized allocation is a bug. A spec that parses must expand its input names (or
//! refuse them) without panicking, and every error must name its field.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for strict in [false, true] {
        match dsort::spec::parse_spec(text, strict) {
            Ok(parsed) => {
                // Up to 10 million names is valid; a few thousand exercise the expansion as well.
                let small = match &parsed.spec.input {
                    dsort::spec::InputSelection::Template(t) => t.count().is_some_and(|c| c <= 4096),
                    _ => true,
                };
                if small {
                    let _ = parsed.spec.input_names();
                }
                let _ = format!("{:?}", parsed.spec);
            }
            Err(e) => assert!(!e.to_string().is_empty(), "an error says what is wrong"),
        }
    }
});
