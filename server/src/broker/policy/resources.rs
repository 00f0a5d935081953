//! The resources file: what the broker knows about tools and targets
//! (owner, sensitivity, kind, parent), read once per load.
//!
//! ```toml
//! [[resource]]
//! id = "https://payments.example"
//! owner = "team-pay"
//! sensitivity = 5
//! kind = "tool"
//! parent = ""          # another resource's id, or empty
//! ```

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use super::error::{Location, PolicyError};

/// One resource as policy sees it (`resource.owner`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Resource {
    pub owner: String,
    pub sensitivity: i64,
    pub kind: String,
    /// Every ancestor through `parent`, nearest first (not the resource itself).
    pub ancestors: Vec<String>,
}

/// The resources file, by id.
#[derive(Debug, Clone, Default)]
pub(super) struct Resources(HashMap<String, Resource>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    resource: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    #[serde(default)]
    owner: String,
    sensitivity: Option<i64>,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    parent: String,
}

impl Resources {
    /// Reads and checks `path` (`None`: no resources, every one unknown).
    /// A resource without `sensitivity` gets `default_sensitivity`.
    pub fn load(path: Option<&Path>, default_sensitivity: i64) -> Result<Self, PolicyError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, &e))?;
        Self::parse(path, &text, default_sensitivity)
    }

    fn parse(path: &Path, text: &str, default_sensitivity: i64) -> Result<Self, PolicyError> {
        let shape: FileShape = toml::from_str(text).map_err(|e| PolicyError::Resources {
            at: Location::at(path, text, e.span().map(|s| s.start)),
            message: super::error::one_line(e.message()),
        })?;
        let bad = |id: &str, message: String| PolicyError::Resources {
            at: Location::at(path, text, find_id(text, id)),
            message,
        };
        let mut parents: HashMap<String, String> = HashMap::new();
        let mut map = HashMap::new();
        for e in shape.resource {
            if e.id.is_empty() {
                return Err(PolicyError::Resources {
                    at: Location::file(path),
                    message: "a [[resource]] has an empty id".into(),
                });
            }
            let sensitivity = e.sensitivity.unwrap_or(default_sensitivity);
            if sensitivity < 0 {
                return Err(bad(&e.id, format!("resource {:?}: sensitivity is negative", e.id)));
            }
            if e.parent == e.id {
                return Err(bad(&e.id, format!("resource {:?} is its own parent", e.id)));
            }
            let resource =
                Resource { owner: e.owner, sensitivity, kind: e.kind, ancestors: Vec::new() };
            if map.insert(e.id.clone(), resource).is_some() {
                return Err(bad(&e.id, format!("resource {:?} is listed twice", e.id)));
            }
            if !e.parent.is_empty() {
                parents.insert(e.id, e.parent);
            }
        }
        for (id, resource) in &mut map {
            let mut seen = HashSet::from([id.as_str()]);
            let mut at = id.as_str();
            while let Some(parent) = parents.get(at) {
                if !seen.insert(parent) {
                    return Err(bad(id, format!("resource {id:?}: its parents form a cycle")));
                }
                resource.ancestors.push(parent.clone());
                at = parent;
            }
        }
        Ok(Self(map))
    }

    /// The resource `id`, if the file names it.
    pub fn get(&self, id: &str) -> Option<&Resource> {
        self.0.get(id)
    }

    /// How many resources the file names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Every resource, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Resource)> {
        self.0.iter()
    }
}

/// Where `id = "<id>"` is in the file (for an error's line).
fn find_id(text: &str, id: &str) -> Option<usize> {
    text.find(&format!("\"{id}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_follow_parents_and_cycles_are_refused() {
        let text = r#"
[[resource]]
id = "a"
parent = "b"
[[resource]]
id = "b"
parent = "c"
sensitivity = 4
"#;
        let r = Resources::parse(Path::new("r.toml"), text, 1).unwrap();
        assert_eq!(r.get("a").unwrap().ancestors, ["b", "c"]);
        assert_eq!(r.get("a").unwrap().sensitivity, 1);
        assert_eq!(r.get("b").unwrap().sensitivity, 4);
        let cycle =
            "[[resource]]\nid = \"a\"\nparent = \"b\"\n[[resource]]\nid = \"b\"\nparent = \"a\"\n";
        let e = Resources::parse(Path::new("r.toml"), cycle, 1).unwrap_err().to_string();
        assert!(e.starts_with("r.toml:") && e.contains("cycle"), "{e}");
    }

    #[test]
    fn malformed_file_names_file_and_line() {
        let text = "[[resource]]\nid = \"a\"\nsensitivity = \"high\"\n";
        let e = Resources::parse(Path::new("r.toml"), text, 1).unwrap_err().to_string();
        assert!(e.starts_with("r.toml:3: "), "{e}");
        assert!(!e.contains('\n'));
    }
}
