//! dsort

pub mod ekm;
pub mod extsort;
pub mod location;
pub mod memory;
pub mod parallel;
pub mod size;
pub mod spec;
pub mod synth;
pub mod template;
pub mod verify;

pub use size::{MemQuantity, SizeError, format_size, parse_mem_quantity, parse_size, parse_size_range};
pub use template::{
    ARCHIVE_EXTENSIONS, MAX_INPUT_NAMES, Template, TemplateError, TemplateKind, TemplateRule, known_archive_extension,
    with_extension,
};
pub mod create;
pub mod dist;
pub mod extract;
pub mod files;
pub mod job;
pub mod key;
pub mod progress;
