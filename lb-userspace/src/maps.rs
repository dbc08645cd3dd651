//! Typed handles on the dataplane maps, from a fresh load or from the pins
//! (for `inspect`, which works whether or not the agent runs).

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
};
use lb_common::{
    AffinityEntry, AffinityKey, AffinityMatchKey, Backend, Config, CtEntry, CtKey, Frontend, FrontendKey,
    MAP_AFFINITY, MAP_AFFINITY_MATCH, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_DROPS, MAP_NODE_ADDRS,
    MAP_SERVICES, MAP_SLOTS, MAP_SOURCE_RANGES, MAP_SVC_STATS, SlotKey, SourceRangeKey, SvcStats,
};

pub struct Maps {
    pub services: HashMap<MapData, FrontendKey, Frontend>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub affinity_match: HashMap<MapData, AffinityMatchKey, u32>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    pub node_addrs: HashMap<MapData, [u8; 4], u32>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub drops: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, Config>,
}

/// Where to get a map from.
trait Source {
    fn map(&mut self, name: &str) -> Result<Map>;
}

impl Source for &mut Ebpf {
    fn map(&mut self, name: &str) -> Result<Map> {
        self.take_map(name).with_context(|| format!("the eBPF object has no map {name}"))
    }
}

impl Source for &Path {
    fn map(&mut self, name: &str) -> Result<Map> {
        let path = self.join(name);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {} (has the agent run?)", path.display()))?;
        Ok(Map::from_map_data(data)?)
    }
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_source(ebpf)
    }

    /// Opens the maps pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::from_source(pin_dir)
    }

    fn from_source(mut src: impl Source) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                src.map($name)?.try_into().with_context(|| format!("map {} has an unexpected type", $name))?
            };
        }
        Ok(Self {
            services: typed!(MAP_SERVICES),
            backends: typed!(MAP_BACKENDS),
            slots: typed!(MAP_SLOTS),
            conntrack: typed!(MAP_CONNTRACK),
            affinity: typed!(MAP_AFFINITY),
            affinity_match: typed!(MAP_AFFINITY_MATCH),
            source_ranges: typed!(MAP_SOURCE_RANGES),
            node_addrs: typed!(MAP_NODE_ADDRS),
            svc_stats: typed!(MAP_SVC_STATS),
            drops: typed!(MAP_DROPS),
            config: typed!(MAP_CONFIG),
        })
    }
}
