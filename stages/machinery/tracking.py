"""Slot identity over time: which slot names follow which regions from frame to frame.

Why a module of its own: the model carries each slot from frame to frame, but slots it cannot
tell apart (tied masks) trade regions by float noise, and distinct slots sometimes swap whole
regions; the pictures, exports and label-free scores want one name per region
(``--track match``, docs/real-video.md). :class:`SlotTracker` renames slots per frame and picks
each token's slot; ``inference.infer_windows`` applies it.
"""

from __future__ import annotations

import torch

from egoslots.pipeline.label_free import TIE_TOLERANCE, tied_argmax


def tie_groups(frame: torch.Tensor, tol: float = TIE_TOLERANCE) -> torch.Tensor:
    """Soft masks (K, N) of one frame -> (K,) a group id per slot: slots the model cannot tell
    apart share one. Two slots are linked when their masks tie (within ``tol`` of the token's
    largest value, ``tied_argmax``) on more than half of the tokens either of them could own;
    groups are the linked components. A slot that owns no token is alone."""
    top = frame.max(dim=0, keepdim=True).values
    tied = (frame >= top - tol).double()  # (K, N)
    both = tied @ tied.T  # tokens both tie on
    either = tied.sum(1)[:, None] + tied.sum(1)[None, :] - both
    linked = (2 * both > either) | torch.eye(frame.shape[0], dtype=torch.bool)
    reach = linked.double()
    for _ in range(frame.shape[0]):  # transitive closure: K is small
        reach = ((reach @ reach) > 0).double()
    return (reach > 0).double().argmax(dim=1)  # the lowest slot of each one's component


def whole_moves(overlap: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """(K, K) token overlaps (names one frame before, slots now), (K,) each name's slot one
    frame before -> (K, K) bool: the renamings a whole region's move justifies.

    A region moves whole when most of a name's tokens of the frame before are in one other slot
    now, and most of that slot's tokens come from the name (a majority both ways). Then the
    name may follow its region to that slot, and the name the slot had may take the slot the
    region left (a swap). A slot that keeps most of its own region is never renamed: neighbours
    trading a few of its tokens do not move its name (docs/real-video.md)."""
    k = overlap.shape[0]
    before = overlap.sum(1, keepdim=True)  # (K, 1) tokens each name held one frame before
    now = overlap.sum(0, keepdim=True)  # (1, K) tokens each slot holds now
    whole = (2 * overlap > before) & (2 * overlap > now)
    whole[torch.arange(k), carried] = False
    names, slots = whole.nonzero(as_tuple=True)
    allowed = whole.clone()
    holder = torch.empty(k, dtype=torch.long)
    holder[carried] = torch.arange(k)  # the name each slot had one frame before
    allowed[holder[slots], carried[names]] = True  # the displaced name takes the region's old slot
    return allowed


class SlotTracker:
    """Renames slots the model cannot tell apart so that each keeps the region it had one frame
    before, and says which slot owns each token.

    Slot attention, the predictor and the decoder treat slots alike whatever their index, and a
    slot carried from frame to frame keeps its index: that is the model's own identity, and
    where its slots are distinct it is kept. But spare slots settle on (near-)identical vectors
    on real footage, and between those the index is only a name: such slots trade a region back
    and forth, which is what the identity switches of ``docs/real-video.md`` are. So, frame by
    frame:

    1. :func:`tie_groups`: slots whose masks tie (within 1e-3) on most of the tokens either could
       own form a group; a distinct slot is a group of its own;
    2. within each group, the names the group's slots had in frame t-1 are matched one-to-one to
       the group's slots by how many tokens they share (tokens labelled by
       ``label_free.tied_argmax`` in the model's order; Hungarian; on a tie a name stays with
       the model's slot it had), and slots and every method's masks are reordered. A name may
       also leave its group when its region moved *whole* to another slot (:func:`whole_moves`:
       a majority of the name's tokens in that slot, and of that slot's tokens from the name;
       ``whole_moves=False`` turns this off): on bikes, distinct slots swapping whole regions
       inside a shot were most of the remaining switches (docs/real-video.md);
    3. each token's slot (``labels``) is chosen among the renamed slots within 1e-3 of its
       largest mask value, keeping the token's slot of frame t-1 when that is one of them
       (``tied_argmax(prefer=)``): a token changes slot only when another slot's mask is clearly
       larger. Otherwise a region tied slots share goes to the lowest of their names whatever
       step 2 chose (bigbuckbunny, docs/real-video.md).

    Renaming distinct slots by any overlap made every frame pair's identity look perfect on
    real footage but cost the demo's synthetic test videos 7 points of video FG-ARI: it
    overrode the model where the model was right (docs/real-video.md); a region that moves
    whole is the one case where the overlap is unambiguous. (Soft-mask overlaps match
    worse in step 2: a slot with a diffuse mask overlaps everything.) The model's own state is
    untouched, so masks as sets, reconstructions and scores that ignore slot order are exactly as
    without it; ``label_free.sticky_labels`` of the renamed masks gives the same ``labels``.
    """

    def __init__(self, whole_moves: bool = True):
        self.previous: torch.Tensor | None = None  # (N,) each token's slot name in the last frame
        self.carried: torch.Tensor | None = None  # (K,) the model's slot of each name, last frame
        self.whole_moves = whole_moves  # also follow a region that moves whole to a distinct slot

    def track(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """masks (t, K, N) of one window in the model's order -> (order (t, K): the model's slot
        index per name, labels (t, N): each token's slot name)."""
        from scipy.optimize import linear_sum_assignment

        orders, labels = [], []
        for frame in masks.float():
            k = frame.shape[0]
            if self.previous is None:
                order = torch.arange(k)
            else:
                current = tied_argmax(frame).long()  # (N,) in the model's order
                overlap = torch.zeros(k * k, dtype=torch.float64)
                overlap.index_add_(
                    0, self.previous * k + current, torch.ones(current.numel(), dtype=torch.float64)
                )
                overlap = overlap.view(k, k)  # (previous names, slots): shared tokens
                carried = self.carried  # (K,) the model's slot of each name one frame before
                group = tie_groups(frame)  # (K,) which slots the model cannot tell apart
                allowed = group[carried][:, None] == group[None, :]
                if self.whole_moves:
                    allowed |= whole_moves(overlap, carried)
                overlap[torch.arange(k), carried] += 0.5 / k  # a tie keeps the model's slot
                overlap[~allowed] = -1e9  # a name moves only within its slot's group
                _, cols = linear_sum_assignment(overlap.numpy(), maximize=True)
                order = torch.as_tensor(cols, dtype=torch.long)
            self.carried = order
            self.previous = tied_argmax(frame[order], prefer=self.previous).long()
            orders.append(order)
            labels.append(self.previous)
        return torch.stack(orders), torch.stack(labels)

    def order(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (t, K, N) in the model's order -> (t, K) slot index per name (:meth:`track`)."""
        return self.track(masks)[0]
