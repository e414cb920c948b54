//! `docs/configuration.md` documents every key the parser accepts, and no
//! other.
//!
//! The parser's keys are read from its own types: [`RawConfig`] is
//! deserialized from [`Keys`], a deserializer that answers every struct
//! with all of the fields the struct asks for (and records their paths),
//! every sequence with one element, every option with a value, and every
//! scalar with a placeholder. `deny_unknown_fields` and `Spanned` do not
//! change the fields a struct asks for, so nothing is kept by hand.
//!
//! The documented keys are read from the reference's structure: a section
//! heading names a table (`` ## `[[ports]]` ``, `` ### `[services.health_check]` ``,
//! or `` ### `backends` `` for a key of the section above), and the first
//! column of each `| Key |` table below it names its keys. A `| Key |`
//! table that follows the `` **`bond`**: `` paragraph of a key of type
//! `table` documents that table's keys (`ports.bond.mode`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde::de::value::{BorrowedStrDeserializer, Error};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::RawConfig;

/// The key paths seen so far, `ports.bond.mode` style (array elements
/// share their array's path).
type Seen = RefCell<BTreeSet<String>>;

/// Deserializes anything, recording the paths of the struct fields.
struct Keys<'a> {
    path: String,
    seen: &'a Seen,
}

impl Keys<'_> {
    fn at(&self, field: &str) -> String {
        if self.path.is_empty() { field.to_owned() } else { format!("{}.{field}", self.path) }
    }
}

/// Deserializer methods for plain values: each gives the visitor a
/// placeholder of its type (the walk records paths, not values).
macro_rules! placeholders {
    ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
                v.$visit($value)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Keys<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!("{}: a type the key walk does not know", self.path)))
    }
    placeholders! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i64(0),
        deserialize_i16 => visit_i64(0),
        deserialize_i32 => visit_i64(0),
        deserialize_i64 => visit_i64(0),
        deserialize_u8 => visit_u64(0),
        deserialize_u16 => visit_u64(0),
        deserialize_u32 => visit_u64(0),
        deserialize_u64 => visit_u64(0),
        deserialize_f32 => visit_f64(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_str => visit_str(""),
        deserialize_string => visit_str(""),
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_some(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_seq(One(Some(self)))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        // toml's `Spanned<T>` is a struct of its span and the value: its
        // fields are not keys, and the value is at the same path.
        let spanned = name.starts_with("$__serde_spanned");
        if !spanned {
            self.seen.borrow_mut().extend(fields.iter().map(|f| self.at(f)));
        }
        v.visit_map(Fields { keys: self, fields: fields.iter(), spanned, next: None })
    }

    serde::forward_to_deserialize_any! {
        char bytes byte_buf unit unit_struct newtype_struct tuple tuple_struct
        map enum identifier ignored_any i128 u128
    }
}

/// A sequence of one element.
struct One<'a>(Option<Keys<'a>>);

impl<'de> SeqAccess<'de> for One<'_> {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.0.take().map(|k| seed.deserialize(k)).transpose()
    }
}

/// Every field of a struct, each with a value.
struct Fields<'a> {
    keys: Keys<'a>,
    fields: std::slice::Iter<'static, &'static str>,
    spanned: bool,
    next: Option<&'static str>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        self.next = self.fields.next().copied();
        self.next.map(|f| seed.deserialize(BorrowedStrDeserializer::new(f))).transpose()
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.next.take().expect("a key before its value");
        let path = if self.spanned { self.keys.path.clone() } else { self.keys.at(field) };
        seed.deserialize(Keys { path, seen: self.keys.seen })
    }
}

/// Every key path the parser accepts, the tables' own (`eal`,
/// `services.health_check`) included.
fn accepted() -> BTreeSet<String> {
    let seen = Seen::default();
    RawConfig::deserialize(Keys { path: String::new(), seen: &seen }).expect("the key walk deserializes RawConfig");
    seen.into_inner()
}

/// The configuration reference.
fn reference() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `code spans` of a piece of Markdown.
fn spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The cells of a table row, trimmed.
fn cells(line: &str) -> Vec<&str> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// What the reference documents.
#[derive(Default)]
struct Documented {
    /// Every table (from the headings) and every key (from the key tables),
    /// as paths.
    keys: BTreeSet<String>,
    /// Each path's type, from its row.
    types: BTreeMap<String, String>,
    /// The top-level sections the overview table lists.
    overview: BTreeSet<String>,
}

fn documented(text: &str) -> Documented {
    let mut d = Documented::default();
    let mut fenced = false;
    // The `##` section's path, the current section's, the key whose
    // paragraph came last, and the table whose rows are being read.
    let (mut top, mut section): (Option<String>, Option<String>) = (None, None);
    let mut lead: Option<String> = None;
    let mut table: Option<String> = None;
    let mut in_overview = false;
    let mut rows = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if !line.starts_with('|') {
            table = None;
            in_overview = false;
        }
        let level = line.chars().take_while(|&c| c == '#').count();
        if (2..=3).contains(&level) && line[level..].starts_with(' ') {
            let title = line[level..].trim();
            lead = None;
            // A heading that is exactly one code span names a table.
            section = match spans(title)[..] {
                [name] if title == format!("`{name}`") => {
                    let bare = name.trim_start_matches('[').trim_end_matches(']');
                    Some(match (&top, name.starts_with('[')) {
                        (Some(t), false) if level == 3 => format!("{t}.{bare}"),
                        _ => bare.to_owned(),
                    })
                }
                _ => None,
            };
            if level == 2 {
                top = section.clone();
            }
            d.keys.extend(section.clone());
            continue;
        }
        if let Some(rest) = line.strip_prefix("**`") {
            lead = rest.split('`').next().map(str::to_owned);
        }
        if !line.starts_with('|') {
            continue;
        }
        let row = cells(line);
        match row[0] {
            "Section" => in_overview = true,
            "Key" => {
                table = section.as_ref().map(|s| match &lead {
                    Some(l) if d.types.get(&format!("{s}.{l}")).is_some_and(|t| t == "table") => format!("{s}.{l}"),
                    _ => s.clone(),
                });
            }
            first if first.starts_with('`') => {
                if in_overview {
                    d.overview.extend(spans(first).iter().map(|s| s.trim_matches(['[', ']']).to_owned()));
                } else if let Some(t) = &table {
                    for key in spans(first) {
                        let path = format!("{t}.{key}");
                        if let Some(kind) = row.get(1) {
                            d.types.insert(path.clone(), (*kind).to_owned());
                        }
                        assert!(rows.insert(path.clone()), "{path} is documented twice");
                        d.keys.insert(path);
                    }
                }
            }
            _ => {}
        }
    }
    d
}

#[test]
fn the_configuration_reference_documents_every_key_and_only_those() {
    let code = accepted();
    let docs = documented(&reference());
    let undocumented: Vec<&String> = code.difference(&docs.keys).collect();
    let unknown: Vec<&String> = docs.keys.difference(&code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "the parser and docs/configuration.md disagree\n  accepted, not documented: {undocumented:?}\n  documented, not accepted: {unknown:?}"
    );
    // The overview lists every top-level section; it may list nested
    // tables too (`[dataplane.timeouts]`), but only tables that exist.
    let missing: Vec<&String> = code.iter().filter(|k| !k.contains('.') && !docs.overview.contains(*k)).collect();
    let unknown: Vec<&String> = docs.overview.difference(&code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "the sections table of docs/configuration.md: missing {missing:?}, not sections {unknown:?}"
    );
}

#[test]
fn the_key_walk_sees_nested_tables_and_arrays_of_tables() {
    let code = accepted();
    for key in ["eal.lcores", "dataplane.timeouts.udp", "ports.bond.transmit_hash", "services.backends.weight"] {
        assert!(code.contains(key), "{key} not in {code:?}");
    }
    assert!(!code.iter().any(|k| k.contains("serde_spanned")), "{code:?}");
}
