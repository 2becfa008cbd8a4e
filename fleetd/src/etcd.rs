//! The etcd v3 registry: a cluster's shared state.
//!
//! Key layout under a prefix (default [`DEFAULT_PREFIX`], `/flotilla/`):
//!
//! ```text
//! {prefix}bodies/{sha256}          unit body, raw UTF-8 text; written once (create-only txn)
//! {prefix}units/{name}             UnitRecord as JSON {"name","hash","desired"}
//! {prefix}machines/{id}            Machine as JSON {"id","address","metadata"}, on the machine's lease
//! {prefix}assignments/{unit}       machine id, plain text; written by txn (compare value/version)
//! {prefix}states/{unit}/{machine}  UnitState as JSON, on the reporting machine's lease
//! {prefix}leader                   {"id","lease"} as JSON, on the leader's lease; created by txn
//! {prefix}reasons                  unit → why it cannot be placed, JSON, on the leader's lease;
//!                                  written by txn only while that lease holds the leader key
//! {prefix}reboot-lock/holders/{id} {"machine","since"} JSON, on the holder's lease: one slot
//! {prefix}reboot-lock/semaphore    the last acquirer's id; rewritten by every acquire, whose
//!                                  txn compares its mod_revision with the read that counted
//!                                  the holders (so two acquires cannot both count N-1)
//! {prefix}rollout                  the rolling OS update (`Rollout` JSON), no lease; started
//!                                  by txn on its read's version/mod_revision (only if none runs),
//!                                  moved on by txn only while the writer's lease leads
//! ```
//!
//! Every read returns the store revision it saw; [`EtcdRegistry::watch`] watches the whole
//! prefix from a revision, so readers pick up exactly where their read ended.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{check_hash, check_key_part, RegistryError, Result};
use crate::model::{
    body_hash, Assignment, DesiredState, Leader, LeaseId, Machine, RebootLockHolder, Revision,
    Rollout, RolloutState, UnitRecord, UnitState,
};
use crate::registry::{
    now_ms, ttl_seconds, Campaign, Cas, Change, Event, Listing, RebootLock, Registry, RolloutStart,
    Snapshot, Watch,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/flotilla/";

/// How often a read-modify-write is retried against concurrent writers.
const CAS_ATTEMPTS: u32 = 16;

/// How to reach etcd and where the registry's keys live.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix; must start and end with `/`. Tests use their own.
    pub prefix: String,
    /// How long to wait for a connection to an endpoint.
    pub connect_timeout: Duration,
    /// How long a single request may take.
    pub request_timeout: Duration,
    /// TLS to etcd (`https://` endpoints): the CA etcd's certificate chains to, and the
    /// client certificate and key etcd's `--client-cert-auth` asks for.
    pub tls: Option<crate::tls::TlsFiles>,
}

impl EtcdConfig {
    /// The defaults: prefix `/flotilla/`, 3 s connect timeout, 5 s request timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    /// The same over TLS with `files` (see [`EtcdConfig::tls`]).
    pub fn with_tls(mut self, files: crate::tls::TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// The same with another key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// The registry on etcd v3. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    keys: Keys,
    endpoints: String,
}

/// The value of the leader key.
#[derive(Serialize, Deserialize)]
struct LeaderValue {
    id: String,
    lease: LeaseId,
}

/// The value of a reboot-lock holder key (its lease is the key's).
#[derive(Serialize, Deserialize)]
struct HolderValue {
    machine: String,
    since: u64,
}

/// The registry's keys under one prefix.
#[derive(Clone, Debug)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn body(&self, hash: &str) -> String {
        format!("{}bodies/{hash}", self.prefix)
    }
    fn bodies(&self) -> String {
        format!("{}bodies/", self.prefix)
    }
    fn unit(&self, name: &str) -> String {
        format!("{}units/{name}", self.prefix)
    }
    fn units(&self) -> String {
        format!("{}units/", self.prefix)
    }
    fn machine(&self, id: &str) -> String {
        format!("{}machines/{id}", self.prefix)
    }
    fn machines(&self) -> String {
        format!("{}machines/", self.prefix)
    }
    fn assignment(&self, unit: &str) -> String {
        format!("{}assignments/{unit}", self.prefix)
    }
    fn assignments(&self) -> String {
        format!("{}assignments/", self.prefix)
    }
    fn state(&self, unit: &str, machine: &str) -> String {
        format!("{}states/{unit}/{machine}", self.prefix)
    }
    fn states(&self) -> String {
        format!("{}states/", self.prefix)
    }
    fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    fn reasons(&self) -> String {
        format!("{}reasons", self.prefix)
    }

    fn rollout(&self) -> String {
        format!("{}rollout", self.prefix)
    }

    /// The reboot lock: its holders and its semaphore key.
    fn reboot_lock(&self) -> String {
        format!("{}reboot-lock/", self.prefix)
    }
    fn reboot_lock_holders(&self) -> String {
        format!("{}reboot-lock/holders/", self.prefix)
    }
    fn reboot_lock_holder(&self, machine: &str) -> String {
        format!("{}reboot-lock/holders/{machine}", self.prefix)
    }
    fn reboot_lock_semaphore(&self) -> String {
        format!("{}reboot-lock/semaphore", self.prefix)
    }
}

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
enum KeyKind<'a> {
    Body(&'a str),
    Unit(&'a str),
    Machine(&'a str),
    Assignment(&'a str),
    State(&'a str, &'a str),
    Leader,
    Reasons,
    RebootLock,
    Rollout,
}

impl Keys {
    fn parse<'a>(&self, key: &'a str) -> Option<KeyKind<'a>> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        if rest == "leader" {
            return Some(KeyKind::Leader);
        }
        if rest == "reasons" {
            return Some(KeyKind::Reasons);
        }
        if rest == "rollout" {
            return Some(KeyKind::Rollout);
        }
        let (kind, name) = rest.split_once('/')?;
        match kind {
            "bodies" => Some(KeyKind::Body(name)),
            "units" => Some(KeyKind::Unit(name)),
            "machines" => Some(KeyKind::Machine(name)),
            "assignments" => Some(KeyKind::Assignment(name)),
            "states" => {
                let (unit, machine) = name.split_once('/')?;
                Some(KeyKind::State(unit, machine))
            }
            "reboot-lock" => Some(KeyKind::RebootLock),
            _ => None,
        }
    }
}

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header
        .map(|h| u64::try_from(h.revision()).unwrap_or(0))
        .unwrap_or(0)
}

fn get_kvs(response: Option<&TxnOpResponse>) -> &[KeyValue] {
    match response {
        Some(TxnOpResponse::Get(get)) => get.kvs(),
        _ => &[],
    }
}

/// States by unit, then machine (key order differs when a unit name is a prefix of another).
fn sorted_states(mut states: Vec<UnitState>) -> Vec<UnitState> {
    states.sort_by(|a, b| (&a.unit, &a.machine).cmp(&(&b.unit, &b.machine)));
    states
}

fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}

/// etcd-client's TLS options from PEM files.
fn etcd_tls(files: &crate::tls::TlsFiles) -> Result<etcd_client::TlsOptions> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            RegistryError::Config(format!(
                "cannot read the etcd {what} {}: {e}",
                path.display()
            ))
        })
    };
    let mut tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("CA", &files.ca)?));
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("client certificate", cert)?,
                read("client key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(RegistryError::Config(
                "an etcd client certificate needs its key and the other way round: give both (--etcd-cert, --etcd-key)".into(),
            ))
        }
    }
    Ok(tls)
}

impl EtcdRegistry {
    /// Sets up a client for `config`. Connections are made lazily: this succeeds while etcd
    /// is unreachable, and each operation then fails with an error naming the endpoints.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(RegistryError::Config(
                "no etcd endpoints: give at least one, e.g. http://127.0.0.1:2379".to_string(),
            ));
        }
        if !config.prefix.starts_with('/') || !config.prefix.ends_with('/') {
            return Err(RegistryError::Config(format!(
                "key prefix {:?} must start and end with '/', e.g. {DEFAULT_PREFIX:?}",
                config.prefix
            )));
        }
        let endpoints = config.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout);
        if let Some(files) = &config.tls {
            options = options.with_tls(etcd_tls(files)?);
        } else if let Some(https) = config.endpoints.iter().find(|e| e.starts_with("https://")) {
            return Err(RegistryError::Config(format!(
                "etcd endpoint {https} is TLS: give the CA and a client certificate and key (fleetd --etcd-ca, --etcd-cert, --etcd-key)"
            )));
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|source| RegistryError::Etcd {
                op: "connect".to_string(),
                endpoints: endpoints.clone(),
                source: Box::new(source),
            })?;
        Ok(EtcdRegistry {
            client,
            keys: Keys {
                prefix: config.prefix,
            },
            endpoints,
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    fn err(&self, op: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> RegistryError {
        let op = op.into();
        let endpoints = self.endpoints.clone();
        move |source| RegistryError::Etcd {
            op,
            endpoints,
            source: Box::new(source),
        }
    }

    /// Like [`Self::err`], but a missing lease becomes [`RegistryError::LeaseExpired`].
    fn lease_err(
        &self,
        op: impl Into<String>,
        lease: LeaseId,
    ) -> impl FnOnce(etcd_client::Error) -> RegistryError {
        let other = self.err(op);
        move |source| {
            if lease_not_found(&source) {
                RegistryError::LeaseExpired { lease }
            } else {
                other(source)
            }
        }
    }

    async fn txn(&self, txn: Txn, op: &str) -> Result<etcd_client::TxnResponse> {
        self.client.clone().txn(txn).await.map_err(self.err(op))
    }

    async fn get_one(&self, key: String, op: &str) -> Result<Option<KeyValue>> {
        let mut response = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(self.err(op))?;
        Ok(response.take_kvs().into_iter().next())
    }

    async fn get_prefix(&self, prefix: String, op: &str) -> Result<(Revision, Vec<KeyValue>)> {
        let mut response = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err(op))?;
        Ok((revision_of(response.header()), response.take_kvs()))
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, kv: &KeyValue) -> Result<T> {
        serde_json::from_slice(kv.value()).map_err(|e| RegistryError::Corrupt {
            location: format!("etcd key {}", String::from_utf8_lossy(kv.key())),
            detail: format!(
                "{e}; fix or delete the key (it was not written by this version of fleetd)"
            ),
        })
    }

    fn decode_leader(&self, kv: &KeyValue) -> Result<Leader> {
        let value: LeaderValue = self.decode(kv)?;
        Ok(Leader {
            id: value.id,
            lease: value.lease,
            term: u64::try_from(kv.create_revision()).unwrap_or(0),
        })
    }

    fn decode_assignment(&self, kv: &KeyValue) -> Result<Assignment> {
        let key = String::from_utf8_lossy(kv.key());
        let unit = key
            .strip_prefix(self.keys.assignments().as_str())
            .unwrap_or(&key)
            .to_string();
        Ok(Assignment {
            unit,
            machine: self.text(kv)?,
        })
    }

    fn text(&self, kv: &KeyValue) -> Result<String> {
        String::from_utf8(kv.value().to_vec()).map_err(|e| RegistryError::Corrupt {
            location: format!("etcd key {}", String::from_utf8_lossy(kv.key())),
            detail: format!("{e}; fix or delete the key"),
        })
    }

    fn decode_all<T: serde::de::DeserializeOwned>(&self, kvs: &[KeyValue]) -> Result<Vec<T>> {
        kvs.iter().map(|kv| self.decode(kv)).collect()
    }

    fn decode_holder(&self, kv: &KeyValue) -> Result<RebootLockHolder> {
        let value: HolderValue = self.decode(kv)?;
        Ok(RebootLockHolder {
            machine: value.machine,
            lease: LeaseId(kv.lease()),
            since: value.since,
        })
    }

    fn encode<T: Serialize>(&self, value: &T, what: &str) -> Result<Vec<u8>> {
        serde_json::to_vec(value).map_err(|e| RegistryError::Corrupt {
            location: what.to_string(),
            detail: format!("cannot encode: {e}"),
        })
    }

    /// Turns one etcd watch event into a registry change; `None` for keys this version does
    /// not know (logged).
    fn change_of(&self, event: &etcd_client::Event) -> Result<Option<Event>> {
        let Some(kv) = event.kv() else {
            return Ok(None);
        };
        let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let Some(kind) = self.keys.parse(&key) else {
            log::warn!("etcd registry: ignoring unknown key {key}");
            return Ok(None);
        };
        let put = event.event_type() == EventType::Put;
        let change = match (kind, put) {
            (KeyKind::Body(hash), true) => Change::BodyPut {
                hash: hash.to_string(),
            },
            (KeyKind::Body(hash), false) => Change::BodyRemoved {
                hash: hash.to_string(),
            },
            (KeyKind::Unit(_), true) => Change::UnitPut(self.decode(kv)?),
            (KeyKind::Unit(name), false) => Change::UnitRemoved {
                name: name.to_string(),
            },
            (KeyKind::Machine(_), true) => Change::MachinePut(self.decode(kv)?),
            (KeyKind::Machine(id), false) => Change::MachineRemoved { id: id.to_string() },
            (KeyKind::Assignment(_), true) => Change::Assigned(self.decode_assignment(kv)?),
            (KeyKind::Assignment(unit), false) => Change::Unassigned {
                unit: unit.to_string(),
            },
            (KeyKind::State(..), true) => Change::StatePut(self.decode(kv)?),
            (KeyKind::State(unit, machine), false) => Change::StateRemoved {
                unit: unit.to_string(),
                machine: machine.to_string(),
            },
            (KeyKind::Leader, true) => Change::LeaderPut(self.decode_leader(kv)?),
            (KeyKind::Leader, false) => Change::LeaderRemoved,
            (KeyKind::Rollout, true) => Change::RolloutPut(Box::new(self.decode(kv)?)),
            // Never removed by fleetd: a removal by hand is the absence `get_rollout` reads.
            (KeyKind::Rollout, false) => return Ok(None),
            // Read on demand (`get_reasons`, `reboot_lock_holders`), never watched.
            (KeyKind::Reasons | KeyKind::RebootLock, _) => return Ok(None),
        };
        Ok(Some(Event { revision, change }))
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn describe(&self) -> String {
        format!(
            "etcd registry at {} under {}",
            self.endpoints, self.keys.prefix
        )
    }

    async fn put_body(&self, body: &str) -> Result<String> {
        let hash = body_hash(body);
        let key = self.keys.body(&hash);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, body, None)]);
        self.txn(txn, &format!("put unit body {hash}")).await?;
        Ok(hash)
    }

    async fn get_body(&self, hash: &str) -> Result<Option<String>> {
        check_hash(hash)?;
        let Some(kv) = self
            .get_one(self.keys.body(hash), &format!("get unit body {hash}"))
            .await?
        else {
            return Ok(None);
        };
        let body = self.text(&kv)?;
        if body_hash(&body) != hash {
            return Err(RegistryError::Corrupt {
                location: format!("etcd key {}", self.keys.body(hash)),
                detail:
                    "the body does not match its sha256; delete the key and submit the unit again"
                        .to_string(),
            });
        }
        Ok(Some(body))
    }

    async fn list_bodies(&self) -> Result<Vec<String>> {
        let prefix = self.keys.bodies();
        let mut response = self
            .client
            .clone()
            .get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(self.err("list unit bodies"))?;
        Ok(response
            .take_kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                key.strip_prefix(prefix.as_str()).map(str::to_string)
            })
            .collect())
    }

    async fn remove_body(&self, hash: &str) -> Result<bool> {
        check_hash(hash)?;
        let response = self
            .client
            .clone()
            .delete(self.keys.body(hash), None)
            .await
            .map_err(self.err(format!("remove unit body {hash}")))?;
        Ok(response.deleted() > 0)
    }

    async fn put_unit(&self, unit: &UnitRecord) -> Result<()> {
        check_key_part("unit name", &unit.name)?;
        check_hash(&unit.hash)?;
        let value = self.encode(unit, &format!("unit {:?}", unit.name))?;
        let txn = Txn::new()
            .when([Compare::version(
                self.keys.body(&unit.hash),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(self.keys.unit(&unit.name), value, None)]);
        let response = self.txn(txn, &format!("put unit {:?}", unit.name)).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(RegistryError::MissingBody {
                name: unit.name.clone(),
                hash: unit.hash.clone(),
            })
        }
    }

    async fn get_unit(&self, name: &str) -> Result<Option<UnitRecord>> {
        check_key_part("unit name", name)?;
        self.get_one(self.keys.unit(name), &format!("get unit {name:?}"))
            .await?
            .map(|kv| self.decode(&kv))
            .transpose()
    }

    async fn list_units(&self) -> Result<Listing<UnitRecord>> {
        let (revision, kvs) = self.get_prefix(self.keys.units(), "list units").await?;
        Ok(Listing {
            revision,
            items: self.decode_all(&kvs)?,
        })
    }

    async fn remove_unit(&self, name: &str) -> Result<bool> {
        check_key_part("unit name", name)?;
        let unit_key = self.keys.unit(name);
        let txn = Txn::new()
            .when([Compare::version(unit_key.clone(), CompareOp::Greater, 0)])
            .and_then([
                TxnOp::delete(unit_key, None),
                TxnOp::delete(self.keys.assignment(name), None),
            ]);
        let response = self.txn(txn, &format!("remove unit {name:?}")).await?;
        Ok(response.succeeded())
    }

    async fn set_desired(&self, name: &str, desired: DesiredState) -> Result<UnitRecord> {
        check_key_part("unit name", name)?;
        let key = self.keys.unit(name);
        let op = format!("set desired state of unit {name:?}");
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = self.get_one(key.clone(), &op).await? else {
                return Err(RegistryError::UnknownUnit {
                    name: name.to_string(),
                });
            };
            let mut unit: UnitRecord = self.decode(&kv)?;
            unit.desired = desired;
            let value = self.encode(&unit, &format!("unit {name:?}"))?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            if self.txn(txn, &op).await?.succeeded() {
                return Ok(unit);
            }
        }
        Err(RegistryError::Contention {
            what: op,
            attempts: CAS_ATTEMPTS,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl_seconds(ttl)?;
        let ttl = i64::try_from(secs).map_err(|_| RegistryError::InvalidTtl {
            ttl_ms: ttl.as_millis(),
        })?;
        let response = self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(self.err(format!("grant a lease of {secs} s")))?;
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // One request on a fresh keep-alive stream: the client waits for the answer and
        // reports a TTL of 0 (lease gone) as "lease not found".
        self.client
            .clone()
            .lease_keep_alive(lease.0)
            .await
            .map(|_| ())
            .map_err(self.lease_err(format!("keep lease {lease} alive"), lease))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.client.clone().lease_revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if lease_not_found(&e) => Ok(()),
            Err(e) => Err(self.err(format!("revoke lease {lease}"))(e)),
        }
    }

    async fn register_machine(&self, machine: &Machine, lease: LeaseId) -> Result<()> {
        check_key_part("machine id", &machine.id)?;
        let key = self.keys.machine(&machine.id);
        let value = self.encode(machine, &format!("machine {:?}", machine.id))?;
        let op = format!("register machine {:?}", machine.id);
        let put = || {
            TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease.0)),
            )
        };
        for _ in 0..CAS_ATTEMPTS {
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(self.lease_err(op.clone(), lease))?;
            if response.succeeded() {
                return Ok(());
            }
            let responses = response.op_responses();
            let Some(existing) = get_kvs(responses.first()).first() else {
                continue; // gone in between: try to create it again
            };
            if existing.lease() != lease.0 {
                return Err(RegistryError::MachineIdTaken {
                    id: machine.id.clone(),
                    holder: LeaseId(existing.lease()),
                });
            }
            // Our own record: update it unless it changed in between.
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    existing.mod_revision(),
                )])
                .and_then([put()]);
            let response = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(self.lease_err(op.clone(), lease))?;
            if response.succeeded() {
                return Ok(());
            }
        }
        Err(RegistryError::Contention {
            what: op,
            attempts: CAS_ATTEMPTS,
        })
    }

    async fn get_machine(&self, id: &str) -> Result<Option<Machine>> {
        check_key_part("machine id", id)?;
        self.get_one(self.keys.machine(id), &format!("get machine {id:?}"))
            .await?
            .map(|kv| self.decode(&kv))
            .transpose()
    }

    async fn list_machines(&self) -> Result<Listing<Machine>> {
        let (revision, kvs) = self
            .get_prefix(self.keys.machines(), "list machines")
            .await?;
        Ok(Listing {
            revision,
            items: self.decode_all(&kvs)?,
        })
    }

    async fn assign(&self, unit: &str, machine: &str, expected: Option<&str>) -> Result<Cas> {
        check_key_part("unit name", unit)?;
        check_key_part("machine id", machine)?;
        if let Some(expected) = expected {
            check_key_part("machine id", expected)?;
        }
        let key = self.keys.assignment(unit);
        let unit_key = self.keys.unit(unit);
        let expectation = match expected {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(m) => Compare::value(key.clone(), CompareOp::Equal, m),
        };
        let txn = Txn::new()
            .when([
                Compare::version(unit_key.clone(), CompareOp::Greater, 0),
                expectation,
            ])
            .and_then([TxnOp::put(key.clone(), machine, None)])
            .or_else([TxnOp::get(unit_key, None), TxnOp::get(key, None)]);
        let response = self
            .txn(txn, &format!("assign unit {unit:?} to machine {machine:?}"))
            .await?;
        if response.succeeded() {
            return Ok(Cas::Done);
        }
        let responses = response.op_responses();
        if get_kvs(responses.first()).is_empty() {
            return Err(RegistryError::UnknownUnit {
                name: unit.to_string(),
            });
        }
        let current = get_kvs(responses.get(1))
            .first()
            .map(|kv| self.text(kv))
            .transpose()?;
        Ok(Cas::Conflict { current })
    }

    async fn unassign(&self, unit: &str, expected: &str) -> Result<Cas> {
        check_key_part("unit name", unit)?;
        check_key_part("machine id", expected)?;
        let key = self.keys.assignment(unit);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, expected)])
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self
            .txn(
                txn,
                &format!("unassign unit {unit:?} from machine {expected:?}"),
            )
            .await?;
        if response.succeeded() {
            return Ok(Cas::Done);
        }
        let responses = response.op_responses();
        let current = get_kvs(responses.first())
            .first()
            .map(|kv| self.text(kv))
            .transpose()?;
        Ok(Cas::Conflict { current })
    }

    async fn get_assignment(&self, unit: &str) -> Result<Option<String>> {
        check_key_part("unit name", unit)?;
        self.get_one(
            self.keys.assignment(unit),
            &format!("get assignment of unit {unit:?}"),
        )
        .await?
        .map(|kv| self.text(&kv))
        .transpose()
    }

    async fn list_assignments(&self) -> Result<Listing<Assignment>> {
        let (revision, kvs) = self
            .get_prefix(self.keys.assignments(), "list assignments")
            .await?;
        Ok(Listing {
            revision,
            items: kvs
                .iter()
                .map(|kv| self.decode_assignment(kv))
                .collect::<Result<_>>()?,
        })
    }

    async fn report_state(&self, state: &UnitState, lease: LeaseId) -> Result<()> {
        check_key_part("unit name", &state.unit)?;
        check_key_part("machine id", &state.machine)?;
        let value = self.encode(state, &format!("state of unit {:?}", state.unit))?;
        self.client
            .clone()
            .put(
                self.keys.state(&state.unit, &state.machine),
                value,
                Some(PutOptions::new().with_lease(lease.0)),
            )
            .await
            .map_err(self.lease_err(
                format!(
                    "report state of unit {:?} on machine {:?}",
                    state.unit, state.machine
                ),
                lease,
            ))?;
        Ok(())
    }

    async fn remove_state(&self, unit: &str, machine: &str) -> Result<bool> {
        check_key_part("unit name", unit)?;
        check_key_part("machine id", machine)?;
        let response = self
            .client
            .clone()
            .delete(self.keys.state(unit, machine), None)
            .await
            .map_err(self.err(format!(
                "remove state of unit {unit:?} on machine {machine:?}"
            )))?;
        Ok(response.deleted() > 0)
    }

    async fn list_states(&self) -> Result<Listing<UnitState>> {
        let (revision, kvs) = self
            .get_prefix(self.keys.states(), "list unit states")
            .await?;
        Ok(Listing {
            revision,
            items: sorted_states(self.decode_all(&kvs)?),
        })
    }

    async fn campaign(&self, id: &str, lease: LeaseId) -> Result<Campaign> {
        check_key_part("machine id", id)?;
        let key = self.keys.leader();
        let value = self.encode(
            &LeaderValue {
                id: id.to_string(),
                lease,
            },
            "leader",
        )?;
        let op = format!("campaign for leader as {id:?}");
        for _ in 0..CAS_ATTEMPTS {
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease.0)),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(self.lease_err(op.clone(), lease))?;
            if response.succeeded() {
                return Ok(Campaign::Won(Leader {
                    id: id.to_string(),
                    lease,
                    term: revision_of(response.header()),
                }));
            }
            let responses = response.op_responses();
            let Some(kv) = get_kvs(responses.first()).first() else {
                continue; // the leadership ended in between: try again
            };
            let current = self.decode_leader(kv)?;
            return Ok(if current.id == id && current.lease == lease {
                Campaign::Won(current)
            } else {
                Campaign::Lost(current)
            });
        }
        Err(RegistryError::Contention {
            what: op,
            attempts: CAS_ATTEMPTS,
        })
    }

    async fn put_reasons(
        &self,
        reasons: &BTreeMap<String, String>,
        lease: LeaseId,
    ) -> Result<bool> {
        let value = self.encode(reasons, "unschedulable reasons")?;
        let txn = Txn::new()
            .when([Compare::lease(
                self.keys.leader(),
                CompareOp::Equal,
                lease.0,
            )])
            .and_then([TxnOp::put(
                self.keys.reasons(),
                value,
                Some(PutOptions::new().with_lease(lease.0)),
            )]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(self.lease_err("publish the unschedulable reasons", lease))?;
        Ok(response.succeeded())
    }

    async fn get_reasons(&self) -> Result<BTreeMap<String, String>> {
        match self
            .get_one(self.keys.reasons(), "get the unschedulable reasons")
            .await?
        {
            Some(kv) => self.decode(&kv),
            None => Ok(BTreeMap::new()),
        }
    }

    async fn leader(&self) -> Result<Option<Leader>> {
        self.get_one(self.keys.leader(), "get leader")
            .await?
            .map(|kv| self.decode_leader(&kv))
            .transpose()
    }

    async fn resign(&self, id: &str, lease: LeaseId) -> Result<bool> {
        check_key_part("machine id", id)?;
        let key = self.keys.leader();
        let value = self.encode(
            &LeaderValue {
                id: id.to_string(),
                lease,
            },
            "leader",
        )?;
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self
            .txn(txn, &format!("resign leadership of {id:?}"))
            .await?
            .succeeded())
    }

    async fn acquire_reboot_lock(
        &self,
        machine: &str,
        lease: LeaseId,
        max_holders: u32,
    ) -> Result<RebootLock> {
        check_key_part("machine id", machine)?;
        let key = self.keys.reboot_lock_holder(machine);
        let semaphore = self.keys.reboot_lock_semaphore();
        let holders_prefix = self.keys.reboot_lock_holders();
        let op = format!("acquire the reboot lock for {machine:?}");
        let with_lease = || Some(PutOptions::new().with_lease(lease.0));
        for _ in 0..CAS_ATTEMPTS {
            // The holders and the semaphore key, at one revision.
            let (_, kvs) = self.get_prefix(self.keys.reboot_lock(), &op).await?;
            let mut holders = Vec::new();
            let mut own = None;
            let mut seen = None;
            for kv in &kvs {
                if kv.key() == semaphore.as_bytes() {
                    seen = Some(kv.mod_revision());
                } else if kv.key().starts_with(holders_prefix.as_bytes()) {
                    if kv.key() == key.as_bytes() {
                        own = Some((kv.lease(), kv.mod_revision(), kv.value().to_vec()));
                    }
                    holders.push(self.decode_holder(kv)?);
                }
            }
            let txn = match own {
                Some((held_on, _, _)) if held_on == lease.0 => return Ok(RebootLock::Acquired),
                // Held on another lease (a restarted fleetd): move the hold to this lease,
                // unless it changed in between. The count does not change.
                Some((_, mod_revision, value)) => Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        mod_revision,
                    )])
                    .and_then([TxnOp::put(key.clone(), value, with_lease())]),
                None => {
                    if holders.len() >= usize::try_from(max_holders).unwrap_or(usize::MAX) {
                        return Ok(RebootLock::Held(holders));
                    }
                    // Nobody acquired since the count was read: the semaphore key is as seen.
                    let unchanged = match seen {
                        Some(rev) => {
                            Compare::mod_revision(semaphore.clone(), CompareOp::Equal, rev)
                        }
                        None => Compare::version(semaphore.clone(), CompareOp::Equal, 0),
                    };
                    let value = self.encode(
                        &HolderValue {
                            machine: machine.to_string(),
                            since: now_ms(),
                        },
                        "reboot lock holder",
                    )?;
                    Txn::new()
                        .when([
                            unchanged,
                            Compare::version(key.clone(), CompareOp::Equal, 0),
                        ])
                        .and_then([
                            TxnOp::put(key.clone(), value, with_lease()),
                            TxnOp::put(semaphore.clone(), machine.as_bytes().to_vec(), None),
                        ])
                }
            };
            let response = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(self.lease_err(op.clone(), lease))?;
            if response.succeeded() {
                return Ok(RebootLock::Acquired);
            }
        }
        Err(RegistryError::Contention {
            what: op,
            attempts: CAS_ATTEMPTS,
        })
    }

    async fn machine_lease(&self, id: &str) -> Result<Option<LeaseId>> {
        check_key_part("machine id", id)?;
        Ok(self
            .get_one(
                self.keys.machine(id),
                &format!("get the lease of machine {id:?}"),
            )
            .await?
            .map(|kv| LeaseId(kv.lease())))
    }

    async fn start_rollout(&self, rollout: &Rollout) -> Result<RolloutStart> {
        let key = self.keys.rollout();
        let op = format!("start the rollout of {:?}", rollout.reference);
        let value = self.encode(rollout, "rollout")?;
        for _ in 0..CAS_ATTEMPTS {
            let unchanged = match self.get_one(key.clone(), &op).await? {
                Some(kv) => {
                    let current: Rollout = self.decode(&kv)?;
                    if current.state == RolloutState::Running {
                        return Ok(RolloutStart::Running(Box::new(current)));
                    }
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
                key.clone(),
                value.clone(),
                None,
            )]);
            if self.txn(txn, &op).await?.succeeded() {
                return Ok(RolloutStart::Started);
            }
        }
        Err(RegistryError::Contention {
            what: op,
            attempts: CAS_ATTEMPTS,
        })
    }

    async fn update_rollout(&self, rollout: &Rollout, lease: LeaseId) -> Result<bool> {
        let key = self.keys.rollout();
        let op = format!("update the rollout of {:?}", rollout.reference);
        let value = self.encode(rollout, "rollout")?;
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = self.get_one(key.clone(), &op).await? else {
                return Ok(false);
            };
            let current: Rollout = self.decode(&kv)?;
            if !current.same_as(rollout) {
                return Ok(false);
            }
            let txn = Txn::new()
                .when([
                    Compare::lease(self.keys.leader(), CompareOp::Equal, lease.0),
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                .or_else([TxnOp::get(self.keys.leader(), None)]);
            let response = self.txn(txn, &op).await?;
            if response.succeeded() {
                return Ok(true);
            }
            let responses = response.op_responses();
            let leads = get_kvs(responses.first())
                .first()
                .is_some_and(|l| l.lease() == lease.0);
            if !leads {
                return Ok(false);
            }
            // The record changed in between (another write of the same leader): read again.
        }
        Err(RegistryError::Contention {
            what: op,
            attempts: CAS_ATTEMPTS,
        })
    }

    async fn get_rollout(&self) -> Result<Option<Rollout>> {
        self.get_one(self.keys.rollout(), "get the rollout")
            .await?
            .map(|kv| self.decode(&kv))
            .transpose()
    }

    async fn release_reboot_lock(&self, machine: &str) -> Result<bool> {
        check_key_part("machine id", machine)?;
        let response = self
            .client
            .clone()
            .delete(self.keys.reboot_lock_holder(machine), None)
            .await
            .map_err(self.err(format!("release the reboot lock of {machine:?}")))?;
        Ok(response.deleted() > 0)
    }

    async fn reboot_lock_holders(&self) -> Result<Listing<RebootLockHolder>> {
        let (revision, kvs) = self
            .get_prefix(
                self.keys.reboot_lock_holders(),
                "list the reboot lock's holders",
            )
            .await?;
        Ok(Listing {
            revision,
            items: kvs
                .iter()
                .map(|kv| self.decode_holder(kv))
                .collect::<Result<_>>()?,
        })
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let prefix = || Some(GetOptions::new().with_prefix());
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.units(), prefix()),
            TxnOp::get(self.keys.machines(), prefix()),
            TxnOp::get(self.keys.assignments(), prefix()),
            TxnOp::get(self.keys.states(), prefix()),
            TxnOp::get(self.keys.leader(), None),
        ]);
        let response = self.txn(txn, "read a snapshot").await?;
        let responses = response.op_responses();
        Ok(Snapshot {
            revision: revision_of(response.header()),
            units: self.decode_all(get_kvs(responses.first()))?,
            machines: self.decode_all(get_kvs(responses.get(1)))?,
            assignments: get_kvs(responses.get(2))
                .iter()
                .map(|kv| self.decode_assignment(kv))
                .collect::<Result<_>>()?,
            states: sorted_states(self.decode_all(get_kvs(responses.get(3)))?),
            leader: get_kvs(responses.get(4))
                .first()
                .map(|kv| self.decode_leader(kv))
                .transpose()?,
        })
    }

    async fn watch(&self, from: Revision) -> Result<Watch> {
        let start = i64::try_from(from)
            .map_err(|_| RegistryError::Config(format!("watch revision {from} is out of range")))?;
        let op = format!("watch {} from revision {from}", self.keys.prefix);
        let mut stream = self
            .client
            .clone()
            .watch(
                self.keys.prefix.clone(),
                Some(WatchOptions::new().with_prefix().with_start_revision(start)),
            )
            .await
            .map_err(self.err(op.clone()))?;
        // Wait until etcd confirms the watch, so that changes made after `watch` returns are
        // seen even with `from = 0`.
        let mut first = stream.message().await.map_err(self.err(op.clone()))?;
        if first
            .as_ref()
            .is_some_and(|r| r.created() && r.events().is_empty() && !r.canceled())
        {
            first = None;
        }
        let (tx, rx) = mpsc::channel(1024);
        let this = self.clone();
        let task = tokio::spawn(async move {
            let mut pending = first;
            loop {
                let response = match pending.take() {
                    Some(response) => response,
                    None => match stream.message().await {
                        Ok(Some(response)) => response,
                        Ok(None) => {
                            let _ = tx
                                .send(Err(RegistryError::WatchEnded {
                                    reason: "etcd closed the watch stream".to_string(),
                                }))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(this.err(op.clone())(e))).await;
                            return;
                        }
                    },
                };
                if response.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(RegistryError::Compacted {
                            requested: from,
                            compacted: u64::try_from(response.compact_revision() - 1).unwrap_or(0),
                        }))
                        .await;
                    return;
                }
                for event in response.events() {
                    match this.change_of(event) {
                        Ok(Some(event)) => {
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                if response.canceled() {
                    let _ = tx
                        .send(Err(RegistryError::WatchEnded {
                            reason: response.cancel_reason().to_string(),
                        }))
                        .await;
                    return;
                }
            }
        });
        Ok(Watch::with_task(rx, task.abort_handle()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let keys = Keys {
            prefix: "/t/".to_string(),
        };
        let hash = body_hash("x");
        assert_eq!(
            keys.parse(&keys.body(&hash)),
            Some(KeyKind::Body(hash.as_str()))
        );
        assert_eq!(keys.parse(&keys.unit("web")), Some(KeyKind::Unit("web")));
        assert_eq!(
            keys.parse(&keys.machine("m1")),
            Some(KeyKind::Machine("m1"))
        );
        assert_eq!(
            keys.parse(&keys.assignment("web")),
            Some(KeyKind::Assignment("web"))
        );
        assert_eq!(
            keys.parse(&keys.state("web", "m1")),
            Some(KeyKind::State("web", "m1"))
        );
        assert_eq!(keys.parse(&keys.leader()), Some(KeyKind::Leader));
        assert_eq!(keys.parse(&keys.reasons()), Some(KeyKind::Reasons));
        assert_eq!(
            keys.parse(&keys.reboot_lock_holder("m1")),
            Some(KeyKind::RebootLock)
        );
        assert_eq!(
            keys.parse(&keys.reboot_lock_semaphore()),
            Some(KeyKind::RebootLock)
        );
        assert_eq!(keys.parse("/t/other/x"), None);
        assert_eq!(keys.parse("/u/units/web"), None);
    }
}
