//! The rolling-upgrade commands (`upgrade finalize`, `upgrade status`, `nodes forget`) and
//! the guard every promote and destroy passes on a shared keystore: no change goes ahead past
//! a node that is known to the keystore but stopped, frozen, unverifiable or too old.

use std::fmt::Write as _;

use super::admin::{AdminError, Opened, Printed};
use crate::keystore::backend::etcd::registry::{Blocker, Survey};
use crate::keystore::format::{FORMAT_VERSION, PRE_FINALIZE_FORMAT};
use crate::keystore::Actor;
use crate::release;

fn joined(blockers: &[Blocker]) -> String {
    blockers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The survey of a shared keystore's nodes; `None` for a file keystore.
async fn survey(o: &Opened) -> Result<Option<Survey>, AdminError> {
    match o.store.nodes(&o.root).await? {
        Some(nodes) => Ok(Some(nodes.survey().await?)),
        None => Ok(None),
    }
}

/// Refuses `what` (a promote or destroy) on a shared keystore while any known node is
/// missing, stale, unverifiable or lacks [`release::KEY_CHANGE_NEEDS`].
pub(super) async fn guard_key_change(o: &Opened, what: &str) -> Result<(), AdminError> {
    let Some(survey) = survey(o).await? else {
        return Ok(());
    };
    let blockers = survey.blockers(release::KEY_CHANGE_NEEDS);
    if blockers.is_empty() {
        return Ok(());
    }
    Err(AdminError::Blocked {
        what: what.to_owned(),
        blockers: joined(&blockers),
    })
}

/// `upgrade finalize`: moves the keystore to this release's format once every node runs it.
pub(super) async fn finalize(o: &Opened) -> Result<Printed, AdminError> {
    let at = o.store.location().clone();
    let ks = o.store.load(&o.root).await?;
    if ks.finalized() {
        return Ok(Printed::out(format!(
            "{at} is already finalized for localkms {} (keystore format {FORMAT_VERSION}); nothing to do\n",
            release::VERSION
        )));
    }
    let survey = survey(o).await?;
    if let Some(survey) = &survey {
        let blockers = survey.blockers(release::FINALIZE_NEEDS);
        if !blockers.is_empty() {
            return Err(AdminError::Blocked {
                what: format!("upgrade finalize of {at}"),
                blockers: joined(&blockers),
            });
        }
    }
    let actor = Actor::current();
    o.store
        .update(&o.root, |ks| {
            ks.finalize(time::OffsetDateTime::now_utc(), &actor);
            Ok(())
        })
        .await?;
    let who = match &survey {
        Some(s) => format!(
            "every node ({}) runs localkms {} or newer",
            s.live
                .iter()
                .map(|n| n.node.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            release::VERSION
        ),
        None => format!(
            "every node you copy {at} to must run localkms {} or newer",
            release::VERSION
        ),
    };
    Ok(Printed::out(format!(
        "finalized {at}: from now on it is written in keystore format {FORMAT_VERSION}, which localkms {} cannot read, so a downgrade is no longer possible; {who}. Each node records the finalize when it loads the change, and from then on refuses an old-format copy of this keystore\n",
        release::PREVIOUS
    ))
    .committed(format!("finalized {at} (keystore format {FORMAT_VERSION})")))
}

/// `upgrade status`: this build, the keystore's format, and each node's release.
pub(super) async fn status(o: &Opened, json: bool) -> Result<Printed, AdminError> {
    let at = o.store.location().clone();
    let ks = o.store.load(&o.root).await?;
    let survey = survey(o).await?;
    let blockers = survey
        .as_ref()
        .map(|s| s.blockers(release::FINALIZE_NEEDS))
        .unwrap_or_default();
    if json {
        let nodes: Vec<serde_json::Value> = survey
            .iter()
            .flat_map(|s| {
                s.known.iter().map(|n| {
                    let cap = s.capabilities.get(n);
                    serde_json::json!({
                        "node": n,
                        "live": s.live.iter().any(|r| &r.node == n),
                        "version": cap.map(|c| c.version.clone()),
                        "capability": s.capability(n),
                        "finalized": cap.is_some_and(|c| c.finalized),
                    })
                })
            })
            .collect();
        return Ok(Printed::out(format!(
            "{}\n",
            serde_json::json!({
                "version": release::VERSION,
                "capability": release::CAPABILITY,
                "keystore": at.to_string(),
                "finalized": ks.finalized(),
                "format": if ks.finalized() { FORMAT_VERSION } else { PRE_FINALIZE_FORMAT },
                "nodes": nodes,
                "finalize_blocked_by": blockers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        )));
    }
    let mut out = format!(
        "this build: localkms {} (capability {})\n",
        release::VERSION,
        release::CAPABILITY
    );
    if ks.finalized() {
        let _ = writeln!(
            out,
            "keystore {at}: finalized (format {FORMAT_VERSION}); localkms {} cannot read it",
            release::PREVIOUS
        );
    } else {
        let _ = writeln!(
            out,
            "keystore {at}: NOT finalized: written in format {PRE_FINALIZE_FORMAT}, which localkms {} still reads, so nodes may run either release",
            release::PREVIOUS
        );
    }
    if let Some(s) = &survey {
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:<16} FINALIZED",
            "NODE", "LIVE", "RELEASE"
        );
        for n in &s.known {
            let cap = s.capabilities.get(n);
            let live = s.live.iter().any(|r| &r.node == n);
            let _ = writeln!(
                out,
                "{:<20} {:<6} {:<16} {}",
                n,
                if live { "yes" } else { "NO" },
                cap.map_or_else(|| release::release_of(0).to_owned(), |c| c.version.clone()),
                if cap.is_some_and(|c| c.finalized) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
    if !ks.finalized() {
        if blockers.is_empty() {
            out.push_str("ready: `localkms upgrade finalize` may run\n");
        } else {
            let _ = writeln!(out, "finalize would be refused: {}", joined(&blockers));
        }
    }
    Ok(Printed::out(out))
}

/// `nodes forget NODE`: takes a node that is gone for good out of the known-node registry.
pub(super) async fn forget(o: &Opened, node: &str) -> Result<Printed, AdminError> {
    let Some(nodes) = o.store.nodes(&o.root).await? else {
        return Err(AdminError::NeedsEtcd("localkms nodes forget"));
    };
    nodes.forget(node).await?;
    Ok(Printed::out(format!(
        "forgot node {node}: promote, destroy and upgrade finalize no longer wait for it. If it comes back, it registers again when it publishes\n"
    ))
    .committed(format!("forgot node {node} in {}", o.store.location())))
}
