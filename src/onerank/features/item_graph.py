"""Graph-based inductive item representations learned multi-task, after MUSIG ("Multi-Task Learning of Graph-based
Inductive Representations of Music Content", Spotify Research, 2021), read like its figure:

    train impressions -> item graph           items engaged with by one user within a window of engagements
                                              (train split only: ``ItemGraph.cutoff`` is the last event used)
    item side features -> GraphSAGE encoder   h_v^k = ReLU(W_k [h_v^(k-1) || mean of sampled neighbours' h_u^(k-1)]),
                                              L2-normalised (torch-geometric's SAGEConv, mean aggregation)
    losses                                    link prediction on co-engagement pairs with sampled negatives (skip-gram)
                                              + cross-entropy on item labels (engagement-rate buckets, side fields
                                              that are not inputs), weighted and summed
    -> item vector table                      every model reads it beside or in place of the id embedding
                                              (``features/item_vectors.py``)

Inductive: the encoder reads features and neighbours, never an item's identity, so an item added after training
(``ItemGraph.with_items``: its features and whatever edges it has) gets a vector without retraining
(``ItemGraphEncoder.table``). With ``use_edges=False`` the same encoder is the feature-only MLP that GraphSAGE reduces
to without edges; with ``label_weight=0`` it is single-task (link prediction) GraphSAGE. Needs the ``graph`` extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerank.data.dataset import EncodedSplit
from onerank.data.encoding import OOV, PAD
from onerank.resources import require


def sage_conv() -> type:
    """torch-geometric's SAGEConv, or a one-line error naming the extra."""
    require("graph", "the item graph encoder", "torch_geometric")
    from torch_geometric.nn import SAGEConv

    return SAGEConv


# ---------------------------------------------------------------------------------------------------------------------
# The item graph: nodes are item id codes, edges co-engagements of the training split
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ItemGraphConfig:
    link_tasks: tuple[str, ...] = ("click",)  # a row is an engagement where one of these labels is 1
    window: int = 5  # two engagements of one user at most this many engagements apart link their items
    max_neighbours: int = 20  # each node keeps its strongest neighbours (by co-engagement count)


@dataclass
class ItemGraph:
    """Undirected weighted item graph over item id codes 0..N-1 (0 padding and 1 out-of-vocabulary have no edges)."""

    features: np.ndarray  # [N, F] side-field codes of each node, the encoder's input
    fields: tuple[str, ...]
    pairs: np.ndarray  # [E, 2] distinct undirected edges (a < b)
    weights: np.ndarray  # [E] co-engagement counts
    max_neighbours: int
    cutoff: int | None = None  # the latest event time an edge was built from

    @property
    def num_nodes(self) -> int:
        return len(self.features)

    def neighbourhoods(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr [N + 1], neighbours): each node's strongest ``max_neighbours`` neighbours, ties by smaller code.
        A function of the edge set alone, so a graph grown by ``with_items`` equals one built with the items."""
        src = np.concatenate([self.pairs[:, 0], self.pairs[:, 1]])
        dst = np.concatenate([self.pairs[:, 1], self.pairs[:, 0]])
        weight = np.concatenate([self.weights, self.weights])
        order = np.lexsort((dst, -weight, src))
        src, dst = src[order], dst[order]
        counts = np.bincount(src, minlength=self.num_nodes)
        starts = np.cumsum(counts) - counts
        keep = (np.arange(len(src)) - starts[src]) < self.max_neighbours
        kept = np.bincount(src[keep], minlength=self.num_nodes)
        return np.concatenate([[0], np.cumsum(kept)]), dst[keep]

    def edge_index(self) -> Tensor:
        """[2, E'] (neighbour, node) message pairs of ``neighbourhoods``, as torch-geometric expects."""
        indptr, neighbours = self.neighbourhoods()
        nodes = np.repeat(np.arange(self.num_nodes), np.diff(indptr))
        return torch.from_numpy(np.stack([neighbours, nodes]).astype(np.int64))

    def with_items(self, features: np.ndarray, pairs: np.ndarray, weights: np.ndarray | None = None) -> "ItemGraph":
        """This graph with new nodes N..N+M-1 (``features`` [M, F]) and new edges (``pairs`` [K, 2] of codes, either
        end old or new; an edge already there adds its weight)."""
        features = np.asarray(features, dtype=np.int64).reshape(-1, len(self.fields))
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        weights = np.ones(len(pairs)) if weights is None else np.asarray(weights, dtype=np.float64)
        total = self.num_nodes + len(features)
        if len(pairs) and (pairs.min() <= OOV or pairs.max() >= total):
            raise ValueError(f"item graph: edges must join item codes 2..{total - 1}")
        merged_pairs, merged_weights = merge_pairs(np.concatenate([self.pairs, pairs]),
                                                   np.concatenate([self.weights, weights]))
        return replace(self, features=np.concatenate([self.features, features]), pairs=merged_pairs,
                       weights=merged_weights)


def merge_pairs(pairs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected pairs as (min, max), self-pairs dropped, repeated pairs summed."""
    pairs = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    keep = pairs[:, 0] != pairs[:, 1]
    pairs, weights = pairs[keep], np.asarray(weights, dtype=np.float64)[keep]
    if not len(pairs):
        return pairs, weights
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return unique, np.bincount(inverse.reshape(-1), weights=weights, minlength=len(unique))


def co_engagements(split: EncodedSplit, item_id: str, tasks: tuple[str, ...], window: int,
                   before: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [E, 2], counts [E]): items engaged with (a ``tasks`` label of 1) by the same user within ``window``
    engagements of each other, in time order; only rows with a time before ``before`` when given."""
    items = split.categorical[item_id]
    engaged = np.zeros(len(split), dtype=bool)
    for task in tasks:
        if task not in split.labels:
            raise ValueError(f"item graph: link task {task!r} is not a task of the data ({sorted(split.labels)})")
        engaged |= (split.labels[task] > 0.5) & split.label_mask[task]
    engaged &= items > OOV
    user = split.user if split.user is not None else np.zeros(len(split), dtype=np.int64)
    time = split.time if split.time is not None else np.arange(len(split))
    if before is not None:
        engaged &= time < before
    rows = np.flatnonzero(engaged)
    rows = rows[np.lexsort((items[rows], time[rows], user[rows]))]
    item, owner = items[rows], user[rows]
    found = [np.stack([item[:-k], item[k:]], 1)[owner[:-k] == owner[k:]] for k in range(1, window + 1)
             if k < len(item)]
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    return merge_pairs(pairs, np.ones(len(pairs)))


def build_item_graph(split: EncodedSplit, item_table: dict[str, np.ndarray], item_id: str, num_items: int,
                     input_fields: tuple[str, ...], config: ItemGraphConfig, before: int | None = None) -> ItemGraph:
    """The item graph of a split (the training split: nothing later may enter it) over codes 0..num_items-1, with the
    ``input_fields`` of the item table as node features. ``before``: only events before this time (the validation
    split's first event, where a date split lets the last training day overlap it, as KuaiRand's does)."""
    pairs, weights = co_engagements(split, item_id, config.link_tasks, config.window, before)
    features = np.stack([np.asarray(item_table[f], dtype=np.int64)[:num_items] for f in input_fields], axis=1) \
        if input_fields else np.zeros((num_items, 0), dtype=np.int64)
    features[PAD] = PAD
    times = split.time if split.time is None or before is None else split.time[split.time < before]
    cutoff = int(times.max()) if times is not None and len(times) else None
    return ItemGraph(features, tuple(input_fields), pairs, weights, config.max_neighbours, cutoff)


def engagement_buckets(split: EncodedSplit, item_id: str, task: str, num_nodes: int, buckets: int = 4,
                       min_impressions: int = 5) -> np.ndarray:
    """[num_nodes] quantile bucket of each item's rate of ``task`` in the split (items with fewer than
    ``min_impressions`` valid impressions: -1, no label)."""
    items = split.categorical[item_id]
    valid = split.label_mask[task]
    shown = np.bincount(items[valid], minlength=num_nodes)[:num_nodes]
    hits = np.bincount(items[valid], weights=split.labels[task][valid], minlength=num_nodes)[:num_nodes]
    labelled = shown >= min_impressions
    labelled[:OOV + 1] = False
    out = np.full(num_nodes, -1, dtype=np.int64)
    if labelled.sum() >= buckets:
        rate = hits[labelled] / shown[labelled]
        edges = np.quantile(rate, np.linspace(0, 1, buckets + 1)[1:-1])
        out[labelled] = np.searchsorted(edges, rate, side="right")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ItemEncoderConfig:
    dim: int = 32  # width of the item vectors
    hidden: int = 64
    field_dim: int = 16
    layers: int = 2
    use_edges: bool = True  # False: the feature-only MLP (GraphSAGE without edges)
    # Training items also get a learned id vector in their input (None: features only, as MUSIG). A share id_dropout
    # of them go without it at each step, as every item added later does; an added item's neighbours keep theirs,
    # which is how its edges bring what the graph learned about those items.
    id_dropout: float | None = None
    sample: int = 10  # neighbours sampled per node in training (inference: all of ``max_neighbours``)
    label_weight: float = 1.0  # weight of the label cross-entropies; 0: single-task (link prediction only)
    negatives: int = 5
    temperature: float = 0.2  # link score = cos(z_a, z_b) / temperature
    lr: float = 3e-3
    batch_pairs: int = 1024
    epochs: int = 30
    patience: int = 3
    seed: int = 0


class ItemGraphEncoder(nn.Module):
    """Node features (+ a training item's id vector, ``id_dropout``) -> input layer -> ``layers`` SAGEConv layers ->
    L2-normalised vectors [N, dim]. ``id_rows``: the nodes that have an id vector (the training graph's)."""

    def __init__(self, field_sizes: list[int], config: ItemEncoderConfig, id_rows: int = 0) -> None:
        super().__init__()
        SAGEConv = sage_conv()
        self.config = config
        self.id_rows = id_rows if config.id_dropout is not None else 0
        self.fields = nn.ModuleList(nn.Embedding(size, config.field_dim, padding_idx=PAD) for size in field_sizes)
        self.input = nn.Linear(max(len(field_sizes), 1) * config.field_dim, config.hidden)
        self.ids = nn.Embedding(self.id_rows, config.hidden) if self.id_rows else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.05)
        widths = [config.hidden] * config.layers + [config.dim]
        self.convs = nn.ModuleList(SAGEConv(a, b, aggr="mean") for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, features: Tensor, edge_index: Tensor) -> Tensor:
        if len(self.fields):
            x = torch.cat([table(features[:, j]) for j, table in enumerate(self.fields)], dim=1)
        else:
            x = features.new_zeros(features.shape[0], self.config.field_dim, dtype=torch.float32)
        h = self.input(x)
        if self.ids is not None:
            nodes = torch.arange(features.shape[0])
            has_id = (nodes < self.id_rows) & (nodes > OOV)
            if self.training:
                has_id &= torch.rand(features.shape[0]) >= self.config.id_dropout
            h = h + self.ids(torch.where(has_id, nodes, 0)) * has_id.unsqueeze(-1)
        h = F.relu(h)
        if not self.config.use_edges:
            edge_index = edge_index[:, :0]
        for k, conv in enumerate(self.convs):
            h = conv(h, edge_index)
            if k < len(self.convs) - 1:
                h = F.normalize(F.relu(h), dim=-1)
        return F.normalize(h, dim=-1)

    @torch.no_grad()
    def table(self, graph: ItemGraph) -> np.ndarray:
        """[N, dim] vectors of every node with its full neighbourhood (row 0, padding, is zero)."""
        self.eval()
        out = self(torch.from_numpy(graph.features), graph.edge_index()).numpy().copy()
        out[PAD] = 0.0
        return out


def sampled_edge_index(indptr: np.ndarray, neighbours: np.ndarray, sample: int, rng: np.random.Generator) -> Tensor:
    """Up to ``sample`` neighbours of each node drawn uniformly without replacement from its neighbourhood (CSR):
    GraphSAGE's fixed-size neighbour sampling, for the whole graph at once."""
    counts = np.diff(indptr)
    nodes = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((rng.random(len(neighbours)), nodes))  # a random order inside each node's segment
    rank = np.arange(len(neighbours)) - indptr[nodes]
    keep = order[rank < sample]
    return torch.from_numpy(np.stack([neighbours[keep], nodes[keep]]).astype(np.int64))


@dataclass
class ItemLabels:
    """Per label name, [N] class of each node (-1: none); the side tasks of the multi-task objective."""

    classes: dict[str, np.ndarray] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {name: int(max(c.max() + 1, 2)) for name, c in self.classes.items()}


@dataclass
class PretrainResult:
    encoder: ItemGraphEncoder
    history: list[dict]
    best_epoch: int


def link_auc(vectors: np.ndarray, pairs: np.ndarray, candidates: np.ndarray, p: np.ndarray | None = None,
             seed: int = 0) -> float:
    """AUC of held-out pairs' cosine against pairs of the same first item with a candidate item drawn with
    probabilities ``p`` (uniform: None)."""
    from onerank.metrics.ranking import auc

    if not len(pairs):
        return float("nan")
    rng = np.random.default_rng(seed)
    negatives = rng.choice(candidates, size=len(pairs), p=p)
    pos = np.sum(vectors[pairs[:, 0]] * vectors[pairs[:, 1]], axis=1)
    neg = np.sum(vectors[pairs[:, 0]] * vectors[negatives], axis=1)
    return auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])


def pretrain(graph: ItemGraph, field_sizes: list[int], labels: ItemLabels, config: ItemEncoderConfig,
             valid_pairs: np.ndarray | None = None, log=None) -> PretrainResult:
    """Train the encoder multi-task on the graph: skip-gram link prediction on its co-engagement edges (each edge
    against ``negatives`` items drawn uniformly from the graph's items) plus ``label_weight`` x the mean label
    cross-entropy. An epoch is one pass over the edges; the best epoch by the link AUC of ``valid_pairs`` (pairs
    engaged with after the graph's cutoff, e.g. the validation split's) is kept (no ``valid_pairs``: the last)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    encoder = ItemGraphEncoder(field_sizes, config, id_rows=graph.num_nodes)
    heads = nn.ModuleDict({name: nn.Linear(config.dim, size) for name, size in labels.sizes().items()})
    optimiser = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=config.lr)
    features = torch.from_numpy(graph.features)
    indptr, neighbours = graph.neighbourhoods()
    items = np.arange(OOV + 1, graph.num_nodes)
    # negatives by degree^0.75 (word2vec's unigram^0.75): positives are popular items, and uniform negatives would
    # teach the vectors popularity rather than which items go together
    degree = np.bincount(graph.pairs.reshape(-1), weights=np.repeat(graph.weights, 2), minlength=graph.num_nodes)
    noise = degree[items] ** 0.75 + 1e-3
    noise /= noise.sum()
    targets = {name: torch.from_numpy(c) for name, c in labels.classes.items()}
    edges = graph.pairs
    node_count = graph.num_nodes
    history, best, best_state, best_epoch, stale = [], -math.inf, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        encoder.train()
        order = rng.permutation(len(edges))
        losses = []
        for start in range(0, max(len(edges), 1), config.batch_pairs):
            batch = torch.from_numpy(edges[order[start:start + config.batch_pairs]])
            messages = sampled_edge_index(indptr, neighbours, config.sample, rng)
            if len(batch):  # the pairs to predict are not messages: a link must be inferred, not looked up
                held = torch.cat([batch[:, 0] * node_count + batch[:, 1], batch[:, 1] * node_count + batch[:, 0]])
                messages = messages[:, ~torch.isin(messages[0] * node_count + messages[1], held)]
            z = encoder(features, messages)
            loss = z.new_zeros(())
            if len(batch):
                a, b = z[batch[:, 0]], z[batch[:, 1]]
                negatives = z[torch.from_numpy(rng.choice(items, size=(len(batch), config.negatives), p=noise))]
                pos = (a * b).sum(-1) / config.temperature
                neg = torch.einsum("pd,pqd->pq", a, negatives) / config.temperature
                loss = F.softplus(-pos).mean() + F.softplus(neg).sum(-1).mean()
            if config.label_weight > 0 and heads:
                label_losses = [F.cross_entropy(heads[name](z), target, ignore_index=-1)
                                for name, target in targets.items() if (target >= 0).any()]
                loss = loss + config.label_weight * torch.stack(label_losses).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch, "loss": float(np.mean(losses))}
        if valid_pairs is not None:
            record["valid_link_auc"] = link_auc(encoder.table(graph), valid_pairs, items, noise, seed=epoch)
        history.append(record)
        if log:
            log(record)
        score = record.get("valid_link_auc", float(epoch))
        if score > best:
            best, stale = score, 0
            best_state = {k: v.clone() for k, v in encoder.state_dict().items()}
            best_epoch = epoch
        else:
            stale += 1
            if stale >= config.patience:
                break
    encoder.load_state_dict(best_state)
    encoder.eval()
    return PretrainResult(encoder, history, best_epoch)


# ---------------------------------------------------------------------------------------------------------------------
# Saving the encoder with its graph (loading never executes code: tensors and plain values only)
# ---------------------------------------------------------------------------------------------------------------------
def save_encoder(path, encoder: ItemGraphEncoder, graph: ItemGraph, field_sizes: list[int]) -> None:
    state = {
        "format": "onerank-item-graph",
        "config": {k: getattr(encoder.config, k) for k in ItemEncoderConfig.__dataclass_fields__},
        "field_sizes": list(field_sizes),
        "id_rows": encoder.id_rows,
        "fields": list(graph.fields),
        "max_neighbours": graph.max_neighbours,
        "cutoff": graph.cutoff,
        "features": torch.from_numpy(graph.features),
        "pairs": torch.from_numpy(graph.pairs),
        "weights": torch.from_numpy(graph.weights),
        "weights_of_encoder": encoder.state_dict(),
    }
    torch.save(state, path)


def load_encoder(path) -> tuple[ItemGraphEncoder, ItemGraph]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable item graph file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "onerank-item-graph":
        raise ValueError(f"{path} is not an onerank item graph file")
    encoder = ItemGraphEncoder(state["field_sizes"], ItemEncoderConfig(**state["config"]), int(state["id_rows"]))
    encoder.load_state_dict(state["weights_of_encoder"])
    encoder.eval()
    graph = ItemGraph(state["features"].numpy(), tuple(state["fields"]), state["pairs"].numpy(),
                      state["weights"].numpy(), int(state["max_neighbours"]), state["cutoff"])
    return encoder, graph
