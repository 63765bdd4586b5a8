//! dsort

pub mod size;
pub mod synth;
pub mod template;

pub use size::{MemQuantity, SizeError, format_size, parse_mem_quantity, parse_size, parse_size_range};
pub use template::{
    ARCHIVE_EXTENSIONS, MAX_INPUT_NAMES, Template, TemplateError, TemplateKind, TemplateRule, known_archive_extension,
    with_extension,
};
