//! Group memberships as the interface server knows them, so that Redis is a cache of them and
//! not their only record.
//!
//! A worker adds a socket to a group with `group_add(group, reply_channel)`; on the Redis layer it
//! then also tells the process that holds the socket, with a small control message on that
//! process's inbox, addressed to the reserved local channel [`MEMBERSHIP_LOCAL`] (a minted local
//! part is 16 alphanumerics, so it can never clash). The inbox records it in a
//! [`MembershipTable`] keyed by its local channels and forgets a channel's groups when its socket
//! goes. After Redis lost its data (a restart without persistence, `FLUSHALL`, a failover to a
//! stale replica), the inbox puts every recorded membership back; see [`super::inbox`].

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use switchyard_routing::codec::{self, CodecError};

/// The local part that membership notices are addressed to, after the inbox name.
pub const MEMBERSHIP_LOCAL: &str = "_membership";

/// What happened to a membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MembershipOp {
    /// `group_add`.
    Add,
    /// `group_discard`.
    Discard,
}

/// A membership notice, as sent to the inbox holding `channel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipNotice {
    /// Added or discarded.
    pub op: MembershipOp,
    /// The group.
    pub group: String,
    /// The full local channel name.
    pub channel: String,
}

impl MembershipNotice {
    /// The msgpack map stored in the inbox.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::to_msgpack(self)
    }

    /// Reads a notice back.
    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        super::wire::decode(payload)
    }
}

/// The name membership notices for the process holding `channel` go to: its inbox followed by
/// [`MEMBERSHIP_LOCAL`]. `None` for a channel that is not process-local.
pub fn notice_channel(channel: &str) -> Option<String> {
    let inbox = switchyard_routing::names::non_local_name(channel);
    (inbox.len() < channel.len()).then(|| format!("{inbox}{MEMBERSHIP_LOCAL}"))
}

/// Groups per local channel of one process; read whole only to put memberships back.
#[derive(Debug, Default)]
pub struct MembershipTable {
    groups: DashMap<String, Vec<String>, FxBuildHasher>,
}

impl MembershipTable {
    /// Applies a notice, for a channel the process holds.
    pub fn apply(&self, notice: MembershipNotice) {
        // Without a cap nothing is refused.
        let _ = self.apply_within(notice, None);
    }

    /// Applies a notice, refusing an `Add` that would give its channel more than `max` groups:
    /// the refused notice comes back, nothing recorded. A group the channel already has is never
    /// refused (a renewed `group_add` is not a new membership).
    pub fn apply_within(
        &self,
        notice: MembershipNotice,
        max: Option<usize>,
    ) -> Result<(), MembershipNotice> {
        match notice.op {
            MembershipOp::Add => {
                let mut groups = self.groups.entry(notice.channel.clone()).or_default();
                if groups.contains(&notice.group) {
                    return Ok(());
                }
                if max.is_some_and(|max| groups.len() >= max) {
                    let empty = groups.is_empty();
                    drop(groups);
                    if empty {
                        // A cap of 0 must not leave an empty entry behind.
                        self.groups.remove_if(&notice.channel, |_, g| g.is_empty());
                    }
                    return Err(notice);
                }
                groups.push(notice.group);
            }
            MembershipOp::Discard => {
                if let Some(mut groups) = self.groups.get_mut(&notice.channel) {
                    groups.retain(|g| *g != notice.group);
                }
                self.groups.remove_if(&notice.channel, |_, g| g.is_empty());
            }
        }
        Ok(())
    }

    /// Groups recorded for `channel`.
    pub fn groups_of(&self, channel: &str) -> usize {
        self.groups.get(channel).map_or(0, |g| g.len())
    }

    /// Forgets every membership of `channel` (its socket is gone).
    pub fn forget(&self, channel: &str) {
        self.groups.remove(channel);
    }

    /// Every `(group, members)` recorded, members grouped per group.
    pub fn by_group(&self) -> Vec<(String, Vec<String>)> {
        let mut by_group: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for entry in self.groups.iter() {
            for g in entry.value() {
                by_group
                    .entry(g.clone())
                    .or_default()
                    .push(entry.key().clone());
            }
        }
        let mut out: Vec<_> = by_group.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, members) in &mut out {
            members.sort();
        }
        out
    }

    /// Memberships recorded.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|e| e.value().len()).sum()
    }

    /// True when no membership is recorded.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Local channels with at least one membership.
    pub fn channels(&self) -> Vec<String> {
        self.groups.iter().map(|e| e.key().clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(op: MembershipOp, group: &str, channel: &str) -> MembershipNotice {
        MembershipNotice {
            op,
            group: group.into(),
            channel: channel.into(),
        }
    }

    #[test]
    fn notices_round_trip_and_apply() {
        let n = notice(MembershipOp::Add, "room", "s.x!a");
        assert_eq!(MembershipNotice::decode(&n.encode().unwrap()).unwrap(), n);
        let table = MembershipTable::default();
        table.apply(n.clone());
        table.apply(n);
        table.apply(notice(MembershipOp::Add, "other", "s.x!a"));
        table.apply(notice(MembershipOp::Add, "room", "s.x!b"));
        assert_eq!(table.len(), 3);
        assert_eq!(
            table.by_group(),
            vec![
                ("other".to_owned(), vec!["s.x!a".to_owned()]),
                (
                    "room".to_owned(),
                    vec!["s.x!a".to_owned(), "s.x!b".to_owned()]
                ),
            ]
        );
        table.apply(notice(MembershipOp::Discard, "room", "s.x!a"));
        table.apply(notice(MembershipOp::Discard, "other", "s.x!a"));
        assert_eq!(table.channels(), vec!["s.x!b".to_owned()]);
        table.forget("s.x!b");
        assert!(table.is_empty());
    }

    #[test]
    fn a_cap_refuses_new_groups_only() {
        let table = MembershipTable::default();
        for g in ["a", "b"] {
            assert!(
                table
                    .apply_within(notice(MembershipOp::Add, g, "s.x!a"), Some(2))
                    .is_ok()
            );
        }
        // Renewing a group it has is fine; a third is refused and not recorded.
        assert!(
            table
                .apply_within(notice(MembershipOp::Add, "a", "s.x!a"), Some(2))
                .is_ok()
        );
        let refused = table
            .apply_within(notice(MembershipOp::Add, "c", "s.x!a"), Some(2))
            .unwrap_err();
        assert_eq!(refused.group, "c");
        assert_eq!(table.groups_of("s.x!a"), 2);
        // Leaving one makes room again.
        table.apply(notice(MembershipOp::Discard, "a", "s.x!a"));
        assert!(
            table
                .apply_within(notice(MembershipOp::Add, "c", "s.x!a"), Some(2))
                .is_ok()
        );
        // A cap of 0 refuses every group and leaves no empty entry.
        assert!(
            table
                .apply_within(notice(MembershipOp::Add, "a", "s.x!z"), Some(0))
                .is_err()
        );
        assert_eq!(table.channels(), vec!["s.x!a".to_owned()]);
    }

    #[test]
    fn only_local_channels_have_a_notice_channel() {
        assert_eq!(
            notice_channel("switchyard.response.abc!def").as_deref(),
            Some("switchyard.response.abc!_membership")
        );
        assert_eq!(notice_channel("http.request"), None);
    }
}
