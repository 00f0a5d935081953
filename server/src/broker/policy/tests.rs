//! The engine against the example policies and against small policy
//! directories written per test.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/broker")
}

fn example_engine() -> PolicyEngine {
    let dir = examples();
    PolicyEngine::load(
        &dir.join("policies"),
        Some(&dir.join("resources.toml")),
        BlastWeights::default(),
    )
    .unwrap()
}

/// A directory holding the example schema and `policies` as `p.cedar`.
fn dir_with(policies: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        examples().join("policies/schema.cedarschema"),
        dir.path().join("schema.cedarschema"),
    )
    .unwrap();
    std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
    dir
}

fn engine_with(policies: &str) -> (tempfile::TempDir, PolicyEngine) {
    let dir = dir_with(policies);
    let engine = PolicyEngine::load(dir.path(), None, BlastWeights::default()).unwrap();
    (dir, engine)
}

const REPORTER: &str = "spiffe://example.org/agents/reporter";
const BILLING: &str = "spiffe://example.org/agents/billing";
const CRM: &str = "https://tools.example/crm";
const PAYMENTS: &str = "https://payments.example";

fn request(who: &str, actions: &[&str], tool: &str, targets: &[&str]) -> AccessRequest {
    let path = who.trim_start_matches("spiffe://example.org").to_string();
    AccessRequest {
        principal: Principal {
            spiffe_id: who.into(),
            trust_domain: "example.org".into(),
            path,
            agent: "spiffe://example.org/tessera/agent/node1".into(),
            selectors: vec!["unix:uid:1000".into()],
            labels: BTreeMap::new(),
        },
        actions: actions.iter().map(|a| a.to_string()).collect(),
        tool: tool.into(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        context: RequestContext {
            task: Some(TaskContext { id: "task-1".into(), age_secs: 30, ..Default::default() }),
            now: 1_700_000_000,
            ..Default::default()
        },
    }
}

#[test]
fn examples_allow_a_read() {
    let d = example_engine().decide(&request(REPORTER, &["read"], CRM, &[]));
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    assert_eq!(d.policies, ["reporter-read-crm"]);
    assert_eq!(d.blast_radius, 3); // 1 × 3 × 1
    assert_eq!(d.reason, "permitted by reporter-read-crm");
    assert_eq!(d.approval, None);
}

#[test]
fn no_permit_denies() {
    let engine = example_engine();
    let d = engine.decide(&request(BILLING, &["read"], CRM, &[]));
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.policies.is_empty());
    assert_eq!(d.reason, format!("no policy permits read on {CRM}"));
    // Without a task, the write permits do not apply.
    let mut req = request(REPORTER, &["write"], CRM, &["https://tools.example/crm/accounts"]);
    req.context.task = None;
    assert_eq!(engine.decide(&req).outcome, Outcome::Deny);
}

#[test]
fn forbid_wins_over_permit() {
    let (_dir, engine) = engine_with(
        r#"@id("all") permit (principal, action, resource);
           @id("no-delete") forbid (principal, action == Tessera::Action::"delete", resource);"#,
    );
    let d = engine.decide(&request(REPORTER, &["delete"], CRM, &[]));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.policies, ["no-delete"]);
    assert_eq!(d.reason, format!("forbidden by no-delete (delete on {CRM})"));
    // Examples: a forbid with no permit at all still names the forbid.
    let d = example_engine().decide(&request(REPORTER, &["delete"], CRM, &[]));
    assert_eq!((d.outcome, d.policies), (Outcome::Deny, vec!["no-crm-delete".to_string()]));
}

#[test]
fn approval_annotation_holds_the_request() {
    let engine = example_engine();
    let mut req = request(BILLING, &["transfer"], PAYMENTS, &[]);
    req.context.amount = Some(500);
    let d = engine.decide(&req);
    assert_eq!(
        (d.outcome, d.policies.as_slice()),
        (Outcome::Allow, &["billing-transfer".into()][..])
    );
    req.context.amount = Some(5000);
    let d = engine.decide(&req);
    assert_eq!(d.outcome, Outcome::Approval, "{d:?}");
    assert_eq!(d.policies, ["billing-transfer-large"]);
    assert_eq!(d.approval.as_deref(), Some("a transfer above 1,000"));
    assert!(d.reason.contains("needs approval: a transfer above 1,000"), "{}", d.reason);
    req.context.amount = Some(60_000);
    assert_eq!(engine.decide(&req).outcome, Outcome::Deny);
    // Anomaly signals forbid it whatever the amount.
    req.context.amount = Some(10);
    req.context.anomalies = vec!["anomaly.broker_denial_burst".into()];
    let d = engine.decide(&req);
    assert_eq!((d.outcome, d.policies), (Outcome::Deny, vec!["no-transfer-when-anomalous".into()]));
}

#[test]
fn approval_above_a_blast_radius_in_policy() {
    let engine = example_engine();
    // One table: 1 × 3 × 3 = 9, on its own.
    let d =
        engine.decide(&request(REPORTER, &["write"], CRM, &["https://tools.example/crm/accounts"]));
    assert_eq!((d.outcome, d.blast_radius), (Outcome::Allow, 9), "{d:?}");
    // Two tables, one of sensitivity 4: 2 × 4 × 3 = 24 > 20.
    let targets = ["https://tools.example/crm/accounts", "https://tools.example/crm/contracts"];
    let d = engine.decide(&request(REPORTER, &["write"], CRM, &targets));
    assert_eq!((d.outcome, d.blast_radius), (Outcome::Approval, 24), "{d:?}");
    assert_eq!(d.policies, ["reporter-write-crm-broad"]);
}

#[test]
fn blast_radius_formula() {
    let engine = example_engine();
    let radius = |actions: &[&str], tool: &str, targets: &[&str]| {
        engine.blast_radius(&request(REPORTER, actions, tool, targets))
    };
    assert_eq!(radius(&["read"], CRM, &[]), 3); // 1 × 3 × 1
    assert_eq!(radius(&["read", "delete"], CRM, &[]), 15); // the heaviest action: 5
    assert_eq!(radius(&["frobnicate"], CRM, &[]), 6); // default_action 2
    assert_eq!(radius(&["write"], "https://unknown.example", &[]), 3); // default sensitivity 1
    let a = "https://tools.example/crm/accounts";
    assert_eq!(radius(&["write"], CRM, &[a, a]), 9); // distinct targets
    assert_eq!(radius(&["write"], CRM, &[a, "https://tools.example/crm/accounts/*"]), 99); // 11 × 3 × 3
    assert_eq!(radius(&["transfer"], PAYMENTS, &["x", "y"]), 50); // 2 × 5 × 5
    let weights: BlastWeights =
        toml::from_str("default_action = 4\nwildcard_breadth = 100\n[actions]\nwrite = 7\n")
            .unwrap();
    assert_eq!(weights.actions["write"], 7);
    assert_eq!(weights.actions["delete"], 5, "a table in the file adds to the defaults");
    assert_eq!((weights.default_action, weights.default_sensitivity), (4, 1));
    let dir = examples();
    let engine =
        PolicyEngine::load(&dir.join("policies"), Some(&dir.join("resources.toml")), weights)
            .unwrap();
    assert_eq!(engine.blast_radius(&request(REPORTER, &["write"], CRM, &["a/*"])), 2100);
    assert_eq!(engine.decide(&request(REPORTER, &["write"], CRM, &["a/*"])).blast_radius, 2100);
}

#[test]
fn every_action_and_target_must_pass() {
    let engine = example_engine();
    let d = engine.decide(&request(REPORTER, &["read", "list"], CRM, &[]));
    assert_eq!(d.outcome, Outcome::Allow);
    let d = engine.decide(&request(REPORTER, &["read", "delete"], CRM, &[]));
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.policies, ["no-crm-delete"]);
    // Every target is a child of the tool, named in the resources file or not.
    let targets = ["https://tools.example/crm/accounts", "https://tools.example/crm/notes"];
    assert_eq!(engine.decide(&request(REPORTER, &["read"], CRM, &targets)).outcome, Outcome::Allow);
    // One denied pair denies the whole request, and the reason names it.
    let d = engine.decide(&request(
        REPORTER,
        &["read"],
        PAYMENTS,
        &["https://payments.example/accounts/operating"],
    ));
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.reason.contains("https://payments.example/accounts/operating"), "{}", d.reason);
    // An action the schema does not know is denied with the reason.
    let d = engine.decide(&request(REPORTER, &["read", "frobnicate"], CRM, &[]));
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.reason.contains("frobnicate"), "{}", d.reason);
    assert_eq!(engine.decide(&request(REPORTER, &[], CRM, &[])).outcome, Outcome::Deny);
}

#[test]
fn unknown_resources_get_defaults() {
    let (_dir, engine) = engine_with(
        r#"@id("defaults") permit (principal, action, resource)
           when { resource.owner == "" && resource.kind == "" && resource.sensitivity == 1 };"#,
    );
    let d = engine.decide(&request(REPORTER, &["read"], "https://unknown.example", &["t1"]));
    assert_eq!(d.outcome, Outcome::Allow, "{d:?}");
    // A known one carries the file's attributes.
    let dir = dir_with(
        r#"@id("team-pay") permit (principal, action, resource)
           when { resource.owner == "team-pay" && resource.sensitivity == 5 && resource.kind == "tool" };"#,
    );
    let engine = PolicyEngine::load(
        dir.path(),
        Some(&examples().join("resources.toml")),
        BlastWeights::default(),
    )
    .unwrap();
    assert_eq!(engine.decide(&request(REPORTER, &["read"], PAYMENTS, &[])).outcome, Outcome::Allow);
    assert_eq!(engine.decide(&request(REPORTER, &["read"], CRM, &[])).outcome, Outcome::Deny);
}

#[test]
fn labels_are_tags_and_task_labels_are_kv() {
    let engine = example_engine();
    let mut req = request("spiffe://example.org/agents/ledger", &["read"], PAYMENTS, &[]);
    assert_eq!(engine.decide(&req).outcome, Outcome::Deny);
    req.principal.labels.insert("team".into(), "finance".into());
    let d = engine.decide(&req);
    assert_eq!((d.outcome, d.policies), (Outcome::Allow, vec!["finance-read-payments".into()]));
    let (_dir, engine) = engine_with(
        r#"@id("ticketed") permit (principal, action, resource)
           when { context.task.labels_kv.contains("ticket=OPS-1") && context.task.age_secs < 60
                  && context.hour == 22 && context.weekday == 1
                  && principal.selectors.contains("unix:uid:1000") };"#,
    );
    let mut req = request(REPORTER, &["read"], CRM, &[]);
    assert_eq!(engine.decide(&req).outcome, Outcome::Deny);
    if let Some(task) = req.context.task.as_mut() {
        task.labels.insert("ticket".into(), "OPS-1".into());
    }
    // 1_700_000_000 is Tuesday 2023-11-14 22:13:20 UTC.
    assert_eq!(engine.decide(&req).outcome, Outcome::Allow);
}

#[test]
fn policies_without_id_are_named_by_file() {
    let (_dir, engine) = engine_with("permit (principal, action, resource);");
    let d = engine.decide(&request(REPORTER, &["read"], CRM, &[]));
    assert_eq!(d.policies, ["p.cedar:policy0"]);
}

#[test]
fn errors_name_file_and_line() {
    let dir = dir_with("@id(\"a\")\npermit (principal, action, resource);\n\npermit (principal, actio, resource);\n");
    let e = check_dir(dir.path(), None).unwrap_err().to_string();
    let file = dir.path().join("p.cedar");
    assert!(e.starts_with(&format!("{}:4: ", file.display())), "{e}");
    assert!(!e.contains('\n'));

    let dir = dir_with(
        "@id(\"a\") permit (principal, action, resource);\n@id(\"ok\")\npermit (principal, action, resource)\n  when { resource.colour == \"red\" };\n",
    );
    let e = check_dir(dir.path(), None).unwrap_err();
    assert!(matches!(e, PolicyError::Validation { ref policy, .. } if policy == "ok"), "{e}");
    let file = dir.path().join("p.cedar");
    assert!(e.to_string().starts_with(&format!("{}:4: policy ok", file.display())), "{e}");

    let dir = dir_with("@id(\"a\") permit (principal, action, resource);\n");
    std::fs::write(
        dir.path().join("q.cedar"),
        "\n@id(\"a\") forbid (principal, action, resource);\n",
    )
    .unwrap();
    let e = check_dir(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("q.cedar:2: duplicate policy id \"a\" (also in"), "{e}");
    assert!(e.ends_with("p.cedar:1)"), "{e}");

    std::fs::remove_file(dir.path().join("schema.cedarschema")).unwrap();
    let e = check_dir(dir.path(), None).unwrap_err().to_string();
    assert!(e.ends_with("0 *.cedarschema files; exactly one is required"), "{e}");

    std::fs::write(
        dir.path().join("s.cedarschema"),
        "namespace Tessera {\n entity Workload\n entity ;\n}\n",
    )
    .unwrap();
    let e = check_dir(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("s.cedarschema:"), "{e}");
}

#[test]
fn check_dir_summarises_the_examples() {
    let dir = examples();
    let s = check_dir(&dir.join("policies"), Some(&dir.join("resources.toml"))).unwrap();
    assert_eq!((s.policies, s.permits, s.forbids, s.approvals), (9, 7, 2, 2));
    assert_eq!(
        (s.files, s.schema.as_str(), s.resources),
        (vec!["tools.cedar".into()], "schema.cedarschema", 5)
    );
}

#[test]
fn reload_keeps_the_old_set_on_a_syntax_error() {
    let (dir, engine) = engine_with(
        r#"@id("read") permit (principal, action == Tessera::Action::"read", resource);"#,
    );
    let read = request(REPORTER, &["read"], CRM, &[]);
    let write = request(REPORTER, &["write"], CRM, &[]);
    assert_eq!(engine.decide(&read).outcome, Outcome::Allow);
    std::fs::write(dir.path().join("p.cedar"), "@id(\"all\") permit (principal, action, resource)")
        .unwrap();
    let e = engine.reload().unwrap_err().to_string();
    assert!(e.contains("p.cedar:1: "), "{e}");
    assert_eq!(engine.decide(&read).outcome, Outcome::Allow, "the old set is in force");
    assert_eq!(engine.decide(&write).outcome, Outcome::Deny);
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"all\") permit (principal, action, resource);",
    )
    .unwrap();
    assert_eq!(engine.reload().unwrap().policies, 1);
    assert_eq!(engine.decide(&write).policies, ["all"]);
}

#[test]
fn reload_keeps_the_old_set_on_a_validation_error() {
    let (dir, engine) = engine_with(
        r#"@id("read") permit (principal, action == Tessera::Action::"read", resource);"#,
    );
    std::fs::write(
        dir.path().join("p.cedar"),
        "@id(\"all\") permit (principal, action, resource) when { principal.colour == \"red\" };",
    )
    .unwrap();
    assert!(matches!(engine.reload(), Err(PolicyError::Validation { .. })));
    let d = engine.decide(&request(REPORTER, &["read"], CRM, &[]));
    assert_eq!(d.policies, ["read"]);
    // A bad resources file is refused the same way.
    let resources = dir.path().join("resources.toml");
    std::fs::write(&resources, "[[resource]]\nid = \"x\"\n").unwrap();
    let engine = PolicyEngine::load(dir.path(), Some(&resources), BlastWeights::default());
    assert!(engine.is_err(), "the validation error still stands");
}

#[tokio::test]
async fn watch_reloads_on_change() {
    let (dir, engine) = engine_with(
        r#"@id("read") permit (principal, action == Tessera::Action::"read", resource);"#,
    );
    let engine = Arc::new(engine);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.clone().watch(Duration::from_millis(20), shutdown.clone()));
    let write = request(REPORTER, &["write"], CRM, &[]);
    tokio::time::sleep(Duration::from_millis(100)).await; // the watcher has its first look
    std::fs::write(
        dir.path().join("q.cedar"),
        r#"@id("write") permit (principal, action, resource);"#,
    )
    .unwrap();
    let mut allowed = false;
    for _ in 0..250 {
        if engine.decide(&write).outcome == Outcome::Allow {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    task.await.unwrap();
    assert!(allowed, "the new file was loaded");
    assert_eq!(engine.summary().files, ["p.cedar", "q.cedar"]);
}

#[test]
fn slices_decide_as_the_whole_set_does() {
    use std::str::FromStr;

    use cedar_policy::{Authorizer, PolicyId, PolicySet, Request};

    let dir = dir_with(
        r#"@id("mutate-narrow") permit (principal, action in [Tessera::Action::"mutate"], resource)
             when { context.breadth < 2 };
           @id("reporter-reads") permit (
             principal == Tessera::Workload::"spiffe://example.org/agents/reporter",
             action in [Tessera::Action::"read", Tessera::Action::"list"], resource);
           @id("reporter-no-delete") forbid (
             principal in Tessera::Workload::"spiffe://example.org/agents/reporter",
             action == Tessera::Action::"delete", resource);
           @id("crm-amount") permit (principal is Tessera::Workload, action,
             resource in Tessera::Resource::"https://tools.example/crm") when { context.amount > 5 };
           @id("billing-all") permit (
             principal == Tessera::Workload::"spiffe://example.org/agents/billing", action, resource);
           @id("no-weekend") forbid (principal, action == Tessera::Action::"transfer", resource)
             when { context.weekday >= 5 };
           @id("accounts-read") permit (principal, action == Tessera::Action::"read",
             resource == Tessera::Resource::"https://tools.example/crm/accounts");
           @id("legal-no-write") forbid (principal, action in [Tessera::Action::"mutate"],
             resource is Tessera::Resource in Tessera::Resource::"https://tools.example/crm/contracts");
           @id("payments-tree") permit (principal, action == Tessera::Action::"list",
             resource in Tessera::Resource::"https://payments.example");"#,
    );
    // An action group: `mutate` holds the writing actions.
    let schema_path = dir.path().join("schema.cedarschema");
    let schema = std::fs::read_to_string(&schema_path).unwrap().replace(
        "  action read, list, write, create, update, delete, transfer, start_task appliesTo {",
        "  action mutate;\n  action write, create, update, delete in [mutate] appliesTo {\n    principal: [Workload], resource: [Resource], context: Request,\n  };\n  action read, list, transfer, start_task appliesTo {",
    );
    std::fs::write(&schema_path, schema).unwrap();
    let resources = examples().join("resources.toml");
    let engine = PolicyEngine::load(dir.path(), Some(&resources), BlastWeights::default()).unwrap();

    let mut whole = PolicySet::new();
    let text = std::fs::read_to_string(dir.path().join("p.cedar")).unwrap();
    for p in PolicySet::from_str(&text).unwrap().policies() {
        whole.add(p.new_id(PolicyId::new(p.annotation("id").unwrap()))).unwrap();
    }
    let loaded = engine.loaded.load();
    let mut checked = 0;
    for who in [REPORTER, BILLING, "spiffe://example.org/agents/other"] {
        for action in ["read", "list", "write", "create", "update", "delete", "transfer"] {
            for (tool, target, amount, now) in [
                (CRM, None, 0, 1_700_000_000),
                (CRM, None, 9, 1_700_300_000),
                (PAYMENTS, None, 9, 0),
                (CRM, Some("https://tools.example/crm/accounts"), 0, 0),
                (CRM, Some("https://tools.example/crm/contracts"), 9, 0),
                (CRM, Some("https://tools.example/crm/other"), 0, 0),
                (PAYMENTS, Some("https://payments.example/accounts/operating"), 0, 0),
                ("https://payments.example/accounts/operating", None, 0, 0),
            ] {
                let mut req = request(who, &[action], tool, target.as_slice());
                req.context.amount = Some(amount);
                req.context.now = now;
                let decision = engine.decide(&req);
                let blast = blast::Blast::of(&req, &engine.weights, &loaded.resources);
                let cedar_request = Request::new(
                    request::workload_uid(who),
                    request::action_uid(action),
                    request::resource_uid(target.unwrap_or(tool)),
                    request::context(&req, &blast).unwrap(),
                    Some(&loaded.schema),
                )
                .unwrap();
                let entities = request::entities(&req, &loaded.entities, &loaded.schema).unwrap();
                let response = Authorizer::new().is_authorized(&cedar_request, &whole, &entities);
                let mut expected: Vec<String> =
                    response.diagnostics().reason().map(ToString::to_string).collect();
                expected.sort();
                let allowed = response.decision() == cedar_policy::Decision::Allow;
                let case = format!("{who} {action} {tool} {target:?} {amount} {now}");
                assert_eq!(decision.outcome == Outcome::Allow, allowed, "{case}: {decision:?}");
                assert_eq!(decision.policies, expected, "{case}");
                checked += usize::from(allowed);
            }
        }
    }
    assert!(checked > 10, "the cases exercise permits too ({checked} allowed)");
}

#[test]
fn a_forbid_whose_evaluation_fails_forbids() {
    // An overflow is an evaluation error (strict validation cannot rule it
    // out): Cedar skips the policy, which for a forbid would let the
    // permit through.
    let (_dir, engine) = engine_with(
        r#"@id("read-all") permit (principal, action, resource);
           @id("no-big-amounts") forbid (principal, action, resource)
           when { context.amount * 9223372036854775807 > 1000 };"#,
    );
    let mut r = request(REPORTER, &["read"], CRM, &[]);
    r.context.amount = Some(5);
    let d = engine.decide(&r);
    assert_eq!(d.outcome, Outcome::Deny, "{d:?}");
    assert!(d.reason.contains("no-big-amounts"), "{}", d.reason);
    // Without the error, the forbid does not apply.
    r.context.amount = Some(0);
    assert_eq!(engine.decide(&r).outcome, Outcome::Allow);
}
