//! Arbitrary text through the shard-name template expander (`{a..b[..step]}`, `@N`, `%0Nd` forms): parse,
//! count, the first and last names, `could_name` against names it produces, and the full expansion of
//! small templates. A name the template produces must be one it says it could name; the expansion must
//! have `count` names, equal to `name_at` of each index.

#![no_main]

use dsort::template::Template;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(t) = Template::parse(text) else { return };
    let _ = (t.kind(), t.prefix(), t.is_bounded(), t.template_extension());
    let count = t.count();
    for index in [0, 1, 2, count.unwrap_or(3).saturating_sub(1), count.unwrap_or(3)] {
        if let Some(name) = t.name_at(index) {
            assert!(count.is_none_or(|c| index < c), "{text:?}: name {index} of {count:?}");
            assert!(t.could_name(&name), "{text:?} produced {name:?} but says it could not name it");
        }
    }
    let _ = t.could_name(text);
    if count.is_some_and(|c| c <= 4096)
        && let Ok(names) = t.expand_input()
    {
        assert_eq!(Some(names.len() as u64), count, "{text:?}");
        for (i, name) in names.iter().enumerate() {
            assert_eq!(t.name_at(i as u64).as_deref(), Some(name.as_str()), "{text:?}");
        }
    }
});
