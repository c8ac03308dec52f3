"""Exercise 6: vary the number of segments k (PAPER.md Sec. 3; consistency.segment_edges, shortft.segment_groups).

Fill in the gaps marked TODO(student), then check:  python -m pytest exercises/check_ex6_segments.py
and print the table for k = 1 .. 50:  python -m exercises.ex6_segments
The DDIM-50 chain 981, 961, ..., 1 is cut into k groups of consecutive timesteps,
as even as possible: group j ends after floor((j + 1) n / k) steps. Its last timestep is the edge s_j
(k = 4: 761, 501, 261, 1). The ShortFT chain runs segment 1 for real, then one shortcut jump and one
base step per later segment.
"""
import ddpm


def segment_edges(T, n_steps, k):
    """The k segment edges on the DDIM-n chain, descending (Hyper-SD's trajectory segments):
    the timestep at position floor((j + 1) n / k) - 1 of the chain, j = 0 .. k - 1."""
    ts = ddpm.ddim_timesteps(T, n_steps)  # (n,) 981, 961, ..., 1 for T = 1000, n = 50
    # TODO(student): raise ValueError unless 1 <= k <= n_steps; then the k edges, descending
    raise NotImplementedError("exercise 6: segment_edges")


def segment_groups(timesteps, edges):
    """Split a descending chain of timesteps into consecutive groups, each ending at an edge:
    981..1 with edges [761, 501, 261, 1] -> [[981, ..., 761], [741, ..., 501], [481, ..., 261], [241, ..., 1]]."""
    # TODO(student): walk the chain, closing a group at every edge; return the list of groups
    raise NotImplementedError("exercise 6: segment_groups")


if __name__ == "__main__":  # the table for k = 1 .. 50: what the chain costs and how far each shortcut jumps
    for k in (1, 2, 4, 8, 25, 50):
        groups = segment_groups(ddpm.ddim_timesteps(1000, 50), segment_edges(1000, 50, k))
        calls = len(groups[0]) + 2 * (k - 1)  # segment 1 for real, then a jump and a base step per segment
        on_path = 1 + 2 * (k - 1)  # the calls the gradient passes through (stage 0)
        longest = max(len(g) - 1 for g in groups[1:]) if k > 1 else 0  # DDIM steps one shortcut jump replaces
        edges = [g[-1] for g in groups]
        print(f"k = {k:2d}: {calls:2d} network calls, {on_path:2d} on the gradient path, longest shortcut "
              f"{longest:2d} steps; edges {edges if k <= 8 else edges[:3] + ['...']}")
