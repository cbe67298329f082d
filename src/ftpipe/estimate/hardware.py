"""The hardware ``ftpipe estimate`` plans for: GPUs (peak, memory, NVLink) and interconnects by name."""

from __future__ import annotations

from dataclasses import dataclass

#: Share of a link's rate that NCCL's ring collectives reach (bus bandwidth over link rate, large messages).
LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class Gpu:
    """A GPU model: dense bf16 peak, memory, and NVLink (or PCIe) bandwidth per GPU and direction."""

    name: str
    peak_tflops: float
    memory_gib: float
    intra_node_gbs: float


@dataclass(frozen=True)
class Interconnect:
    """A network between nodes: its rate in Gbit/s, per GPU (one NIC per GPU) or per node (shared)."""

    name: str
    gbit_s: float
    per: str  # "gpu" or "node"

    def gbs_per_gpu(self, gpus_per_node: int) -> float:
        """GB/s one GPU gets, one direction."""
        rate = self.gbit_s / 8
        return rate if self.per == "gpu" else rate / max(1, gpus_per_node)


#: The GPUs ``plan_gpu`` names (the schema's ``PlanGpu`` lists the same keys).
GPUS: dict[str, Gpu] = {
    "a100-40gb": Gpu("A100 SXM 40GB", 312.0, 40.0, 300.0),
    "a100-80gb": Gpu("A100 SXM 80GB", 312.0, 80.0, 300.0),
    "h100": Gpu("H100 SXM 80GB", 989.0, 80.0, 450.0),
    "h200": Gpu("H200 SXM 141GB", 989.0, 141.0, 450.0),
    "b200": Gpu("B200 180GB", 2250.0, 180.0, 900.0),
    "l40s": Gpu("L40S 48GB (PCIe)", 362.0, 48.0, 25.0),
    "l4": Gpu("L4 24GB (PCIe)", 121.0, 24.0, 25.0),
}
#: The interconnects ``interconnect`` names (the schema's ``InterconnectName`` lists the same keys).
INTERCONNECTS: dict[str, Interconnect] = {
    "ib-ndr": Interconnect("InfiniBand NDR, 400 Gb/s per GPU", 400.0, "gpu"),
    "ib-hdr": Interconnect("InfiniBand HDR, 200 Gb/s per GPU", 200.0, "gpu"),
    "efa-p5": Interconnect("AWS EFA on p5, 3200 Gb/s per node", 3200.0, "node"),
    "efa-p4d": Interconnect("AWS EFA on p4d, 400 Gb/s per node", 400.0, "node"),
    "ethernet-100": Interconnect("Ethernet, 100 Gb/s per node", 100.0, "node"),
    "ethernet-25": Interconnect("Ethernet, 25 Gb/s per node", 25.0, "node"),
}
