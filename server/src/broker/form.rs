//! Reading a token or introspection request: the form body (RFC 6749
//! §3.2, `application/x-www-form-urlencoded`, each parameter at most once
//! except `audience` and `resource`), and what it asks for, normalized so
//! that the same request always hashes the same.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::error::BrokerError;

/// The token-exchange grant.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// A JWT (a JWT-SVID) as a subject or actor token.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// An access token, the default requested token type.
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
/// SPIFFE client authentication (draft-ietf-oauth-spiffe-client-auth).
pub const ASSERTION_JWT_SPIFFE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe";

/// Largest form body read, bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Most `authorization_details` objects.
pub const MAX_DETAILS: usize = 16;
/// Most actions, or targets, in one request.
pub const MAX_ITEMS: usize = 64;
/// Longest action, target, type or scope token.
pub const MAX_ITEM_LEN: usize = 512;

/// A decoded form: the parameters, in order.
#[derive(Debug, Default)]
pub struct Form(Vec<(String, String)>);

/// Parameters that may appear more than once (RFC 8693 §2.1).
const REPEATABLE: [&str; 2] = ["audience", "resource"];

impl Form {
    /// Decodes a body; a parameter given twice (but `audience`/`resource`)
    /// is refused, as RFC 6749 §3.2 says.
    pub fn parse(body: &[u8]) -> Result<Self, BrokerError> {
        if std::str::from_utf8(body).is_err() {
            return Err(BrokerError::InvalidRequest("form body is not UTF-8".into()));
        }
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in form_urlencoded::parse(body) {
            if !REPEATABLE.contains(&k.as_ref()) && pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(BrokerError::InvalidRequest(format!("parameter {k} given twice")));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Self(pairs))
    }

    /// A parameter's value (`None` when absent or empty).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    /// Every value of a repeatable parameter.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    /// A required parameter.
    pub fn require(&self, key: &str) -> Result<&str, BrokerError> {
        self.get(key).ok_or_else(|| BrokerError::InvalidRequest(format!("{key} is required")))
    }
}

/// What a token request asks for, normalized (sorted, de-duplicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// The tool: the one `audience` or `resource`.
    pub tool: String,
    /// Actions: from `authorization_details[].actions` and `scope`.
    pub actions: Vec<String>,
    /// Targets: `authorization_details[].locations` and `identifier`.
    pub targets: Vec<String>,
    /// `scope` tokens as asked (empty when no scope).
    pub scope: Vec<String>,
    /// `authorization_details`, re-serialized canonically (empty: none).
    pub details: Vec<Value>,
    /// Their types.
    pub detail_types: Vec<String>,
    /// Their `datatypes`.
    pub datatypes: Vec<String>,
    /// The largest `amount` among them, if any.
    pub amount: Option<i64>,
    /// The task it acts within.
    pub task: String,
}

impl Ask {
    /// Reads the ask of a token-exchange form; `types` are the accepted
    /// `authorization_details` types.
    pub fn from_form(form: &Form, types: &[String]) -> Result<Self, BrokerError> {
        let tool = tool_of(form)?;
        let scope: Vec<String> = match form.get("scope") {
            None => Vec::new(),
            Some(s) => {
                let tokens: BTreeSet<String> =
                    s.split(' ').filter(|t| !t.is_empty()).map(str::to_string).collect();
                for t in &tokens {
                    check_item("scope token", t).map_err(BrokerError::InvalidScope)?;
                }
                tokens.into_iter().collect()
            }
        };
        let mut actions: BTreeSet<String> = scope.iter().cloned().collect();
        let mut targets = BTreeSet::new();
        let mut detail_types = BTreeSet::new();
        let mut datatypes = BTreeSet::new();
        let mut amount: Option<i64> = None;
        let details = match form.get("authorization_details") {
            None => Vec::new(),
            Some(text) => parse_details(text)?,
        };
        for d in &details {
            let obj =
                d.as_object().ok_or_else(|| details_err("every element must be an object"))?;
            let ty = match obj.get("type") {
                Some(Value::String(t)) if !t.is_empty() => t.clone(),
                _ => return Err(details_err("every element needs a string \"type\"")),
            };
            if !types.contains(&ty) {
                return Err(details_err(&format!(
                    "type {ty:?} is not supported (supported: {})",
                    types.join(", ")
                )));
            }
            detail_types.insert(ty);
            actions.extend(strings(obj, "actions")?);
            targets.extend(strings(obj, "locations")?);
            datatypes.extend(strings(obj, "datatypes")?);
            strings(obj, "privileges")?;
            match obj.get("identifier") {
                None => {}
                Some(Value::String(id)) => {
                    check_item("identifier", id).map_err(|e| details_err(&e))?;
                    targets.insert(id.clone());
                }
                Some(_) => return Err(details_err("\"identifier\" must be a string")),
            }
            match obj.get("amount") {
                None => {}
                Some(v) => {
                    let a = amount_of(v).ok_or_else(|| {
                        details_err(
                            "\"amount\" must be a non-negative integer (or a string of one)",
                        )
                    })?;
                    amount = Some(amount.map_or(a, |m: i64| m.max(a)));
                }
            }
        }
        if actions.is_empty() {
            return Err(BrokerError::InvalidScope(
                "no action requested: give scope or authorization_details with actions".into(),
            ));
        }
        if actions.len() > MAX_ITEMS || targets.len() > MAX_ITEMS {
            return Err(BrokerError::InvalidRequest(format!(
                "more than {MAX_ITEMS} actions or targets"
            )));
        }
        let task = form.require("task")?.to_string();
        check_item("task", &task).map_err(BrokerError::InvalidRequest)?;
        Ok(Self {
            tool,
            actions: actions.into_iter().collect(),
            targets: targets.into_iter().collect(),
            scope,
            details,
            detail_types: detail_types.into_iter().collect(),
            datatypes: datatypes.into_iter().collect(),
            amount,
            task,
        })
    }

    /// `action target` pairs, what a task records as done.
    pub fn pairs(&self) -> Vec<String> {
        let targets: Vec<&str> = if self.targets.is_empty() {
            vec![self.tool.as_str()]
        } else {
            self.targets.iter().map(String::as_str).collect()
        };
        self.actions.iter().flat_map(|a| targets.iter().map(move |t| format!("{a} {t}"))).collect()
    }
}

/// The tool named by `audience` and/or `resource`: exactly one distinct value.
fn tool_of(form: &Form) -> Result<String, BrokerError> {
    let mut tools = BTreeSet::new();
    for a in form.all("audience") {
        tools.insert(a.to_string());
    }
    for r in form.all("resource") {
        if !r.contains("://") || r.contains('#') {
            return Err(BrokerError::InvalidTarget(format!(
                "resource {:?} is not an absolute URI without a fragment (RFC 8707)",
                super::error::one_line(r)
            )));
        }
        tools.insert(r.to_string());
    }
    tools.remove("");
    match tools.len() {
        0 => Err(BrokerError::InvalidRequest("audience or resource (the tool) is required".into())),
        1 => {
            let tool = tools.into_iter().next().unwrap_or_default();
            check_item("audience", &tool).map_err(BrokerError::InvalidTarget)?;
            Ok(tool)
        }
        _ => Err(BrokerError::InvalidTarget(
            "a token is for one tool: audience and resource name more than one".into(),
        )),
    }
}

fn parse_details(text: &str) -> Result<Vec<Value>, BrokerError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        details_err(&format!("not JSON: {}", super::error::one_line(&e.to_string())))
    })?;
    let Value::Array(items) = value else { return Err(details_err("must be a JSON array")) };
    if items.is_empty() {
        return Err(details_err("must not be empty"));
    }
    if items.len() > MAX_DETAILS {
        return Err(details_err(&format!("more than {MAX_DETAILS} elements")));
    }
    Ok(items)
}

fn strings(obj: &Map<String, Value>, key: &str) -> Result<Vec<String>, BrokerError> {
    match obj.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => {
                    check_item(key, s).map(|_| s.clone()).map_err(|e| details_err(&e))
                }
                _ => Err(details_err(&format!("\"{key}\" must be an array of strings"))),
            })
            .collect(),
        Some(_) => Err(details_err(&format!("\"{key}\" must be an array of strings"))),
    }
}

fn amount_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().filter(|a| *a >= 0),
        Value::String(s) => s.parse::<i64>().ok().filter(|a| *a >= 0),
        _ => None,
    }
}

fn check_item(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_ITEM_LEN || s.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!(
            "{what} {:?} must be 1 to {MAX_ITEM_LEN} characters without spaces or control characters",
            super::error::one_line(s)
        ));
    }
    Ok(())
}

fn details_err(why: &str) -> BrokerError {
    BrokerError::InvalidDetails(format!("authorization_details: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(body: &str) -> Result<Ask, BrokerError> {
        Ask::from_form(&Form::parse(body.as_bytes())?, &["tool_access".to_string()])
    }

    #[test]
    fn a_request_is_normalized() {
        let details = r#"[{"type":"tool_access","actions":["write","read"],"locations":["b","a"],"amount":7}]"#;
        let body = format!(
            "audience=https%3A%2F%2Ft&scope=read+read&task=t1&authorization_details={}",
            form_urlencoded::byte_serialize(details.as_bytes()).collect::<String>()
        );
        let a = ask(&body).unwrap();
        assert_eq!(a.tool, "https://t");
        assert_eq!(a.actions, ["read", "write"]);
        assert_eq!(a.targets, ["a", "b"]);
        assert_eq!(a.amount, Some(7));
        assert_eq!(a.pairs().len(), 4);
    }

    #[test]
    fn bad_forms_are_refused_with_their_code() {
        let code = |b: &str| ask(b).unwrap_err().code();
        assert_eq!(code("audience=a&audience=b&scope=r&task=t"), "invalid_target");
        assert_eq!(code("scope=r&task=t"), "invalid_request");
        assert_eq!(code("audience=a&task=t"), "invalid_scope");
        assert_eq!(code("audience=a&scope=r"), "invalid_request");
        assert_eq!(code("audience=a&scope=r&task=t&task=u"), "invalid_request");
        assert_eq!(
            code("audience=a&task=t&authorization_details=%5B"),
            "invalid_authorization_details"
        );
        assert_eq!(
            code("audience=a&task=t&authorization_details=%7B%7D"),
            "invalid_authorization_details"
        );
        assert_eq!(
            code("audience=a&task=t&authorization_details=%5B%7B%22type%22%3A%22x%22%7D%5D"),
            "invalid_authorization_details"
        );
        assert_eq!(code("resource=not-a-uri&scope=r&task=t"), "invalid_target");
        assert!(Form::parse(b"\xff=1").is_err());
    }
}
