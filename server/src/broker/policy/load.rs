//! Reading a policy directory: the one `*.cedarschema`, every `*.cedar`
//! (each parsed on its own, so an error names its file and line), strict
//! validation against the schema, and the resources file. The result,
//! [`Loaded`], is everything a decision needs, built once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{Authorizer, Effect, PolicyId, PolicySet, Schema, ValidationMode, Validator};

use super::blast::BlastWeights;
use super::error::{first_offset, one_line, Location, PolicyError};
use super::request::ResourceEntities;
use super::resources::Resources;
use super::slices::Slices;
use super::types::PolicySummary;

/// A loaded, validated policy set and what decisions read with it.
#[derive(Debug)]
pub(super) struct Loaded {
    pub schema: Schema,
    /// The validated set, sliced by principal and action scope.
    pub slices: Slices,
    /// `@approval` values by policy id.
    pub approvals: HashMap<String, String>,
    pub resources: Resources,
    pub entities: ResourceEntities,
    pub authorizer: Authorizer,
    pub summary: PolicySummary,
}

/// The policy files of `dir`: (schema, policies), each sorted by name.
fn list(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), PolicyError> {
    let read = std::fs::read_dir(dir).map_err(|e| PolicyError::io(dir, &e))?;
    let (mut schemas, mut policies) = (Vec::new(), Vec::new());
    for entry in read {
        let path = entry.map_err(|e| PolicyError::io(dir, &e))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cedarschema") => schemas.push(path),
            Some("cedar") => policies.push(path),
            _ => {}
        }
    }
    if schemas.len() != 1 {
        return Err(PolicyError::SchemaCount {
            dir: dir.display().to_string(),
            found: schemas.len(),
        });
    }
    policies.sort();
    Ok((schemas.remove(0), policies))
}

/// The files a load reads (for the watcher): the directory's policy and
/// schema files and the resources file.
pub(super) fn watched_files(dir: &Path, resources: Option<&Path>) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|read| {
            read.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(p.extension().and_then(|e| e.to_str()), Some("cedar" | "cedarschema"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.extend(resources.map(Path::to_path_buf));
    files
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|e| PolicyError::io(path, &e))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into())
}

/// Loads `dir` and `resources`: see the module doc.
pub(super) fn load(
    dir: &Path,
    resources: Option<&Path>,
    weights: &BlastWeights,
) -> Result<Loaded, PolicyError> {
    let (schema_path, policy_paths) = list(dir)?;
    let schema_text = read(&schema_path)?;
    let (schema, _warnings) =
        Schema::from_cedarschema_str(&schema_text).map_err(|e| PolicyError::Schema {
            at: Location::at(&schema_path, &schema_text, first_offset(&e)),
            message: one_line(&e),
        })?;

    // Each file on its own: Cedar's ids (`policy0` …) restart per file, and
    // an error's offsets are in that file's text.
    let mut policies = PolicySet::new();
    let mut origin: HashMap<String, usize> = HashMap::new(); // policy id -> file index
    let mut texts: Vec<(PathBuf, String)> = Vec::new();
    let mut approvals = HashMap::new();
    let (mut permits, mut forbids) = (0, 0);
    for path in &policy_paths {
        let text = read(path)?;
        let set = PolicySet::from_str(&text).map_err(|e| PolicyError::Syntax {
            at: Location::at(path, &text, first_offset(&e)),
            message: one_line(&e),
        })?;
        if set.templates().next().is_some() {
            return Err(PolicyError::Syntax {
                at: Location::file(path),
                message: "policy templates (?principal, ?resource) are not supported".into(),
            });
        }
        let name = file_name(path);
        for policy in set.policies() {
            let id = match policy.annotation("id") {
                Some(id) if !id.is_empty() => id.to_string(),
                _ => format!("{name}:{}", policy.id()),
            };
            if let Some(&first) = origin.get(&id) {
                let (first_path, first_text) = &texts[first];
                let needle = format!("\"{id}\"");
                return Err(PolicyError::DuplicateId {
                    at: Location::at(path, &text, text.find(&needle)),
                    id,
                    other: Location::at(first_path, first_text, first_text.find(&needle)),
                });
            }
            if let Some(why) = policy.annotation("approval") {
                let why = if why.is_empty() { format!("policy {id}") } else { why.to_string() };
                approvals.insert(id.clone(), why);
            }
            match policy.effect() {
                Effect::Permit => permits += 1,
                Effect::Forbid => forbids += 1,
            }
            origin.insert(id.clone(), texts.len());
            policies.add(policy.new_id(PolicyId::new(&id))).map_err(|e| PolicyError::Syntax {
                at: Location::file(path),
                message: one_line(&e),
            })?;
        }
        texts.push((path.clone(), text));
    }

    let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    if let Some(e) = result.validation_errors().next() {
        let policy = e.policy_id().to_string();
        let at = match origin.get(&policy).map(|&i| &texts[i]) {
            Some((path, text)) => Location::at(path, text, first_offset(e)),
            None => Location::file(dir),
        };
        return Err(PolicyError::Validation { at, policy, message: one_line(e) });
    }

    let slices = Slices::build(&policies, &schema)
        .map_err(|message| PolicyError::Syntax { at: Location::file(dir), message })?;
    let resources_map = Resources::load(resources, weights.default_sensitivity)?;
    let entities = ResourceEntities::build(&resources_map, weights.default_sensitivity);
    let summary = PolicySummary {
        dir: dir.display().to_string(),
        policies: permits + forbids,
        permits,
        forbids,
        approvals: approvals.len(),
        files: policy_paths.iter().map(|p| file_name(p)).collect(),
        schema: file_name(&schema_path),
        resources: resources_map.len(),
        resources_file: resources.map(|p| p.display().to_string()),
        loaded_at: now_unix(),
    };
    Ok(Loaded {
        schema,
        slices,
        approvals,
        resources: resources_map,
        entities,
        authorizer: Authorizer::new(),
        summary,
    })
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
