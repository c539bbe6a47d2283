//! Allocation of channel prefixes, Redis databases and ACL key prefixes (pure).
//!
//! Nothing is kept in memory: what is taken is read from the `.status` of the other FusionCache resources
//! (each status says on which endpoint it holds which prefix and database), so allocations survive operator
//! restarts and are released when a resource (and so its status) goes away.
//!
//! Rules:
//! - a channel prefix is unique per backplane endpoint (Redis endpoint or NATS URL) across the cluster;
//! - a Redis database is unique per Redis endpoint; `auto` gives the lowest free index and keeps the one a
//!   resource already holds; an explicit index must be free and below the endpoint's database count;
//! - the key prefixes of the apps on one Redis endpoint must not overlap (one a prefix of the other), ACL or
//!   not, whatever their databases (an ACL cannot restrict `SELECT`, and `~prefix*` would reach the other's
//!   keys);
//! - when two resources claim the same thing (a race, or edits), the older one (creation time, then
//!   namespace/name) keeps it; the error says whether the loser held it ([`AllocationError::held`]), so that
//!   it gives up the objects that use it.

use std::fmt;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{FusionCache, FusionCacheStatus};

/// A FusionCache's namespace and name, shown as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ResourceKey {
    /// The key of a resource (an empty namespace when it has none).
    pub fn of(fc: &FusionCache) -> Self {
        Self {
            namespace: fc.namespace().unwrap_or_default(),
            name: fc.name_any(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Who wins a tie: older creation time first, then namespace/name. Resources without a creation time rank
/// last.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    unknown_age: bool,
    created: Option<Timestamp>,
    key: ResourceKey,
}

impl Rank {
    /// The rank of a resource.
    pub fn of(fc: &FusionCache) -> Self {
        let created = fc.metadata.creation_timestamp.as_ref().map(|t| t.0);
        Self {
            unknown_age: created.is_none(),
            created,
            key: ResourceKey::of(fc),
        }
    }
}

/// What another resource holds, read from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Its rank (and key).
    pub rank: Rank,
    /// The endpoint its channel prefix is on.
    pub backplane_endpoint: Option<String>,
    /// Its channel prefix.
    pub channel_prefix: Option<String>,
    /// The Redis endpoint of its database and ACL user.
    pub redis_endpoint: Option<String>,
    /// Its database.
    pub redis_database: Option<u32>,
    /// The prefix of its Redis keys (on `redis_endpoint`).
    pub key_prefix: Option<String>,
}

impl Claim {
    /// The claim of a resource (from its status).
    pub fn of(fc: &FusionCache) -> Self {
        let status = fc.status.clone().unwrap_or_default();
        Self {
            rank: Rank::of(fc),
            backplane_endpoint: status.backplane_endpoint,
            channel_prefix: status.channel_prefix,
            redis_endpoint: status.redis_endpoint,
            redis_database: status.redis_database,
            key_prefix: status.key_prefix,
        }
    }

    /// The resource holding the claim.
    pub fn key(&self) -> &ResourceKey {
        &self.rank.key
    }
}

/// Why an allocation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// Another resource holds the channel prefix on this endpoint.
    #[error(
        "channel prefix `{prefix}` is already used on endpoint `{endpoint}` by FusionCache {other}; set a \
         different spec.channelPrefix or spec.environment"
    )]
    ChannelPrefixClash {
        /// The prefix.
        prefix: String,
        /// The endpoint.
        endpoint: String,
        /// The resource holding it.
        other: ResourceKey,
        /// Whether this resource held it too (and loses it).
        held: bool,
    },
    /// The requested index is not below the endpoint's database count.
    #[error("Redis database {index} is out of range on endpoint `{endpoint}`: it has {databases} databases (0 to {max})", max = databases.saturating_sub(1))]
    DatabaseOutOfRange {
        /// The requested index.
        index: u32,
        /// The endpoint.
        endpoint: String,
        /// Its database count.
        databases: u32,
    },
    /// Another resource holds the requested index.
    #[error("Redis database {index} on endpoint `{endpoint}` is already used by FusionCache {other}; use `auto` or another index")]
    DatabaseConflict {
        /// The requested index.
        index: u32,
        /// The endpoint.
        endpoint: String,
        /// The resource holding it.
        other: ResourceKey,
        /// Whether this resource held it too (and loses it).
        held: bool,
    },
    /// Every index of the endpoint is taken.
    #[error("no free Redis database on endpoint `{endpoint}`: all {databases} are allocated")]
    NoFreeDatabase {
        /// The endpoint.
        endpoint: String,
        /// Its database count.
        databases: u32,
        /// Whether this resource held a database there that an older resource now holds.
        held: bool,
    },
    /// The key prefix overlaps the key prefix of another app on the endpoint.
    #[error(
        "key prefix `{prefix}` overlaps the key prefix `{other_prefix}` of FusionCache {other} on endpoint \
         `{endpoint}`: the apps could read and delete each other's keys; set a different spec.keyPrefix"
    )]
    KeyPrefixOverlap {
        /// The prefix.
        prefix: String,
        /// The other prefix.
        other_prefix: String,
        /// The endpoint.
        endpoint: String,
        /// The resource holding it.
        other: ResourceKey,
        /// Whether this resource held it too (and loses it).
        held: bool,
    },
}

impl AllocationError {
    /// The `Ready=False` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AllocationError::ChannelPrefixClash { .. } => "ChannelPrefixClash",
            AllocationError::DatabaseOutOfRange { .. } => "DatabaseOutOfRange",
            AllocationError::DatabaseConflict { .. } => "DatabaseConflict",
            AllocationError::NoFreeDatabase { .. } => "NoFreeDatabase",
            AllocationError::KeyPrefixOverlap { .. } => "KeyPrefixOverlap",
        }
    }

    /// Whether the condition depends only on the resource's own spec (so only a spec change fixes it),
    /// rather than on other resources that may go away.
    pub fn is_spec_error(&self) -> bool {
        matches!(self, AllocationError::DatabaseOutOfRange { .. })
    }

    /// Whether this resource held the contested allocation: it lost it to an older resource and must give
    /// up the objects (ConfigMap, Secret, ACL user) that use it, so that the two apps never share.
    pub fn held(&self) -> bool {
        match self {
            AllocationError::ChannelPrefixClash { held, .. }
            | AllocationError::DatabaseConflict { held, .. }
            | AllocationError::NoFreeDatabase { held, .. }
            | AllocationError::KeyPrefixOverlap { held, .. } => *held,
            AllocationError::DatabaseOutOfRange { .. } => false,
        }
    }
}

/// The default channel prefix: `{namespace}.{cacheName}`, plus `.{environment}` when set.
pub fn default_channel_prefix(
    namespace: &str,
    cache_name: &str,
    environment: Option<&str>,
) -> String {
    match environment.filter(|e| !e.is_empty()) {
        Some(env) => format!("{namespace}.{cache_name}.{env}"),
        None => format!("{namespace}.{cache_name}"),
    }
}

/// The requested database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseChoice {
    /// The lowest free index, or the one already held.
    Auto,
    /// Exactly this index.
    Index(u32),
}

/// Allocates for one resource against the claims of all the others.
#[derive(Debug, Clone)]
pub struct Allocator {
    own: Rank,
    own_status: FusionCacheStatus,
    others: Vec<Claim>,
}

impl Allocator {
    /// An allocator for `own`, given every FusionCache in the cluster (`own` among them or not: it is
    /// skipped by namespace/name).
    pub fn new(own: &FusionCache, all: &[FusionCache]) -> Self {
        let rank = Rank::of(own);
        let others = all
            .iter()
            .filter(|fc| ResourceKey::of(fc) != rank.key)
            .map(Claim::of)
            .collect();
        Self {
            own: rank,
            own_status: own.status.clone().unwrap_or_default(),
            others,
        }
    }

    /// Whether `other` wins over this resource for something both hold: it does when this resource does not
    /// hold it yet, or when `other` is older.
    fn other_wins(&self, own_holds: bool, other: &Claim) -> bool {
        !own_holds || other.rank < self.own
    }

    /// Checks that `prefix` is free on `endpoint`.
    pub fn channel_prefix(&self, endpoint: &str, prefix: &str) -> Result<(), AllocationError> {
        let own_holds = self.own_status.backplane_endpoint.as_deref() == Some(endpoint)
            && self.own_status.channel_prefix.as_deref() == Some(prefix);
        let clash = self.others.iter().find(|c| {
            c.backplane_endpoint.as_deref() == Some(endpoint)
                && c.channel_prefix.as_deref() == Some(prefix)
                && self.other_wins(own_holds, c)
        });
        match clash {
            Some(c) => Err(AllocationError::ChannelPrefixClash {
                prefix: prefix.to_string(),
                endpoint: endpoint.to_string(),
                other: c.key().clone(),
                held: own_holds,
            }),
            None => Ok(()),
        }
    }

    /// Allocates a database on `endpoint`, which has `databases` of them.
    pub fn database(
        &self,
        endpoint: &str,
        choice: DatabaseChoice,
        databases: u32,
    ) -> Result<u32, AllocationError> {
        let own_held = (self.own_status.redis_endpoint.as_deref() == Some(endpoint))
            .then_some(self.own_status.redis_database)
            .flatten();
        let winner_of = |index: u32| {
            self.others.iter().find(|c| {
                c.redis_endpoint.as_deref() == Some(endpoint)
                    && c.redis_database == Some(index)
                    && self.other_wins(own_held == Some(index), c)
            })
        };
        match choice {
            DatabaseChoice::Index(index) => {
                if index >= databases {
                    return Err(AllocationError::DatabaseOutOfRange {
                        index,
                        endpoint: endpoint.to_string(),
                        databases,
                    });
                }
                match winner_of(index) {
                    Some(c) => Err(AllocationError::DatabaseConflict {
                        index,
                        endpoint: endpoint.to_string(),
                        other: c.key().clone(),
                        held: own_held == Some(index),
                    }),
                    None => Ok(index),
                }
            }
            DatabaseChoice::Auto => {
                if let Some(held) = own_held {
                    if held < databases && winner_of(held).is_none() {
                        return Ok(held);
                    }
                }
                (0..databases)
                    .find(|i| {
                        !self.others.iter().any(|c| {
                            c.redis_endpoint.as_deref() == Some(endpoint)
                                && c.redis_database == Some(*i)
                        })
                    })
                    .ok_or_else(|| AllocationError::NoFreeDatabase {
                        endpoint: endpoint.to_string(),
                        databases,
                        held: own_held.is_some(),
                    })
            }
        }
    }

    /// Checks that a key prefix does not overlap another app's on `endpoint` (one being a prefix of the
    /// other, or equal), ACL or not.
    pub fn key_prefix(&self, endpoint: &str, prefix: &str) -> Result<(), AllocationError> {
        let own_holds = self.own_status.redis_endpoint.as_deref() == Some(endpoint)
            && self.own_status.key_prefix.as_deref() == Some(prefix);
        let clash = self.others.iter().find(|c| {
            c.redis_endpoint.as_deref() == Some(endpoint)
                && c.key_prefix
                    .as_deref()
                    .is_some_and(|other| other.starts_with(prefix) || prefix.starts_with(other))
                && self.other_wins(own_holds, c)
        });
        match clash {
            Some(c) => Err(AllocationError::KeyPrefixOverlap {
                prefix: prefix.to_string(),
                other_prefix: c.key_prefix.clone().unwrap_or_default(),
                endpoint: endpoint.to_string(),
                other: c.key().clone(),
                held: own_holds,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{FusionCacheSpec, Transport};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn fc(ns: &str, name: &str, created: &str) -> FusionCache {
        let mut fc = FusionCache::new(
            name,
            FusionCacheSpec {
                cache_name: name.into(),
                transport: Transport::Redis,
                redis: None,
                nats: None,
                channel_prefix: None,
                environment: None,
                key_prefix: None,
                distributed_cache: true,
            },
        );
        fc.metadata.namespace = Some(ns.into());
        fc.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        fc
    }

    fn holding(
        mut fc: FusionCache,
        endpoint: &str,
        prefix: Option<&str>,
        db: Option<u32>,
    ) -> FusionCache {
        fc.status = Some(FusionCacheStatus {
            backplane_endpoint: Some(endpoint.into()),
            channel_prefix: prefix.map(Into::into),
            redis_endpoint: Some(endpoint.into()),
            redis_database: db,
            ..Default::default()
        });
        fc
    }

    const T1: &str = "2024-01-01T00:00:00Z";
    const T2: &str = "2024-01-02T00:00:00Z";
    const T3: &str = "2024-01-03T00:00:00Z";

    #[test]
    fn default_prefix_is_namespace_and_cache_name_plus_environment() {
        assert_eq!(
            default_channel_prefix("shop", "products", None),
            "shop.products"
        );
        assert_eq!(
            default_channel_prefix("shop", "products", Some("prod")),
            "shop.products.prod"
        );
        assert_eq!(
            default_channel_prefix("shop", "products", Some("")),
            "shop.products"
        );
    }

    #[test]
    fn auto_database_takes_the_lowest_free_index_on_the_endpoint() {
        let me = fc("a", "me", T3);
        let all = vec![
            holding(fc("b", "x", T1), "main", Some("b.x"), Some(0)),
            holding(fc("b", "y", T1), "main", Some("b.y"), Some(2)),
            holding(fc("c", "z", T1), "other", Some("c.z"), Some(1)),
            me.clone(),
        ];
        let alloc = Allocator::new(&me, &all);
        assert_eq!(alloc.database("main", DatabaseChoice::Auto, 16), Ok(1));
        assert_eq!(alloc.database("other", DatabaseChoice::Auto, 16), Ok(0));
        assert_eq!(alloc.database("empty", DatabaseChoice::Auto, 16), Ok(0));
    }

    #[test]
    fn auto_database_is_stable_once_given() {
        let me = holding(fc("a", "me", T3), "main", Some("a.me"), Some(5));
        let all = vec![me.clone()];
        // Lower indexes are free, but the held one is kept.
        assert_eq!(
            Allocator::new(&me, &all).database("main", DatabaseChoice::Auto, 16),
            Ok(5)
        );
        // Not on another endpoint.
        assert_eq!(
            Allocator::new(&me, &all).database("other", DatabaseChoice::Auto, 16),
            Ok(0)
        );
        // Not when the endpoint shrank below it.
        assert_eq!(
            Allocator::new(&me, &all).database("main", DatabaseChoice::Auto, 4),
            Ok(0)
        );
    }

    #[test]
    fn deleting_a_resource_releases_its_database() {
        let me = fc("a", "me", T3);
        let other = holding(fc("b", "x", T1), "main", Some("b.x"), Some(0));
        assert_eq!(
            Allocator::new(&me, &[other, me.clone()]).database("main", DatabaseChoice::Auto, 16),
            Ok(1)
        );
        assert_eq!(
            Allocator::new(&me, std::slice::from_ref(&me)).database(
                "main",
                DatabaseChoice::Auto,
                16
            ),
            Ok(0)
        );
    }

    #[test]
    fn explicit_database_is_range_checked_and_conflicts_name_the_holder() {
        let me = fc("a", "me", T3);
        let all = vec![holding(fc("b", "x", T1), "main", Some("b.x"), Some(3))];
        let alloc = Allocator::new(&me, &all);
        assert_eq!(alloc.database("main", DatabaseChoice::Index(4), 16), Ok(4));
        let err = alloc
            .database("main", DatabaseChoice::Index(16), 16)
            .unwrap_err();
        assert_eq!(err.reason(), "DatabaseOutOfRange");
        assert!(err.to_string().contains("0 to 15"), "{err}");
        let err = alloc
            .database("main", DatabaseChoice::Index(3), 16)
            .unwrap_err();
        assert_eq!(err.reason(), "DatabaseConflict");
        assert!(err.to_string().contains("b/x"), "{err}");
    }

    #[test]
    fn no_free_database_is_reported() {
        let me = fc("a", "me", T3);
        let all = vec![
            holding(fc("b", "x", T1), "main", Some("b.x"), Some(0)),
            holding(fc("b", "y", T1), "main", Some("b.y"), Some(1)),
        ];
        let err = Allocator::new(&me, &all)
            .database("main", DatabaseChoice::Auto, 2)
            .unwrap_err();
        assert_eq!(err.reason(), "NoFreeDatabase");
    }

    #[test]
    fn a_double_claim_goes_to_the_older_resource() {
        let older = holding(fc("b", "old", T1), "main", Some("p"), Some(1));
        let newer = holding(fc("a", "new", T2), "main", Some("p"), Some(1));
        let all = vec![older.clone(), newer.clone()];
        assert_eq!(
            Allocator::new(&older, &all).database("main", DatabaseChoice::Auto, 16),
            Ok(1)
        );
        assert_eq!(
            Allocator::new(&newer, &all).database("main", DatabaseChoice::Auto, 16),
            Ok(0)
        );
        assert!(Allocator::new(&older, &all)
            .channel_prefix("main", "p")
            .is_ok());
        let err = Allocator::new(&newer, &all)
            .channel_prefix("main", "p")
            .unwrap_err();
        assert!(err.to_string().contains("b/old"), "{err}");
    }

    #[test]
    fn channel_prefix_clash_is_per_endpoint_and_names_the_other_resource() {
        let me = fc("shop", "me", T3);
        let all = vec![holding(
            fc("other-ns", "orders", T1),
            "main",
            Some("shop.products"),
            None,
        )];
        let alloc = Allocator::new(&me, &all);
        let err = alloc.channel_prefix("main", "shop.products").unwrap_err();
        assert_eq!(err.reason(), "ChannelPrefixClash");
        assert!(err.to_string().contains("other-ns/orders"), "{err}");
        assert!(alloc
            .channel_prefix("nats://n:4222", "shop.products")
            .is_ok());
        assert!(alloc.channel_prefix("main", "shop.products.prod").is_ok());
    }

    #[test]
    fn own_status_is_not_a_clash() {
        let me = holding(fc("shop", "me", T3), "main", Some("shop.me"), Some(0));
        let all = vec![me.clone()];
        let alloc = Allocator::new(&me, &all);
        assert!(alloc.channel_prefix("main", "shop.me").is_ok());
        assert_eq!(alloc.database("main", DatabaseChoice::Index(0), 16), Ok(0));
    }

    #[test]
    fn key_prefixes_must_not_overlap_acl_or_not() {
        // The other app has no ACL user: its keys must still be out of reach.
        let mut other = holding(fc("b", "x", T1), "main", Some("b.x"), Some(3));
        if let Some(s) = other.status.as_mut() {
            s.key_prefix = Some("product:".into());
        }
        let me = fc("a", "me", T3);
        let all = vec![other];
        let alloc = Allocator::new(&me, &all);
        let err = alloc.key_prefix("main", "product:").unwrap_err();
        assert_eq!(err.reason(), "KeyPrefixOverlap");
        assert!(err.to_string().contains("b/x"), "{err}");
        assert!(!err.held(), "it never held the prefix");
        assert!(alloc.key_prefix("main", "product:42:").is_err());
        assert!(alloc.key_prefix("main", "prod").is_err());
        assert!(alloc.key_prefix("main", "products:").is_ok());
        assert!(alloc.key_prefix("elsewhere", "product:").is_ok());
    }

    #[test]
    fn the_loser_of_a_double_claim_is_told_it_held_it() {
        let mut older = holding(fc("b", "old", T1), "main", Some("p"), Some(1));
        let mut newer = holding(fc("a", "new", T2), "main", Some("p"), Some(1));
        for f in [&mut older, &mut newer] {
            f.status.as_mut().unwrap().key_prefix = Some("k:".into());
        }
        let all = vec![older.clone(), newer.clone()];
        let loser = Allocator::new(&newer, &all);
        assert!(loser.channel_prefix("main", "p").unwrap_err().held());
        assert!(loser.key_prefix("main", "k:").unwrap_err().held());
        assert!(loser
            .database("main", DatabaseChoice::Index(1), 16)
            .unwrap_err()
            .held());
        assert!(loser
            .database("main", DatabaseChoice::Index(2), 2)
            .is_err_and(|e| !e.held()));
        let moved = Allocator::new(&newer, &all).database("main", DatabaseChoice::Auto, 2);
        assert_eq!(moved, Ok(0), "auto moves to a free database");
        let third = holding(fc("c", "z", T1), "main", Some("q"), Some(0));
        let all = vec![older, newer.clone(), third];
        let err = Allocator::new(&newer, &all)
            .database("main", DatabaseChoice::Auto, 2)
            .unwrap_err();
        assert_eq!(err.reason(), "NoFreeDatabase");
        assert!(err.held(), "{err}");
    }
}
