"""`scribe explain superposition`: the two small experiments of superposition, with
plots. (1) how nearly orthogonal random directions are in d dimensions, before and
after pushing them apart; (2) the toy model: n sparse features through d < n
dimensions and back through a ReLU (5 features in 2 dimensions: a pentagon)."""

from __future__ import annotations

from scribelm.cli.common import console, print_json


def register(subparsers) -> None:
    p = subparsers.add_parser("superposition", help="near-orthogonal directions and the toy model of superposition (PNGs)",
                              description=__doc__)
    p.add_argument("--only", choices=["counting", "toy"], help="run one of the two experiments")
    g = p.add_argument_group("counting")
    g.add_argument("--dim", type=int, default=100, help="dimensions d (default 100)")
    g.add_argument("--vectors", type=int, default=10_000, help="how many random unit vectors (default 10,000)")
    g.add_argument("--epsilon", type=float, default=5.0, help="report the share of pairs within 90° ± ε (default 5)")
    g.add_argument("--spread-steps", type=int, default=100, help="optimisation steps that push them apart (default 100)")
    g = p.add_argument_group("toy model")
    g.add_argument("--features", type=int, default=5, help="sparse features n (default 5)")
    g.add_argument("--hidden", type=int, default=2, help="hidden dimensions d < n (default 2)")
    g.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.7, 0.9],
                   help="chances that a feature is zero, one model each (default 0 0.7 0.9)")
    g.add_argument("--importance-decay", type=float, default=0.9, help="importance of feature i: decay^i (default 0.9)")
    g.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="explain-superposition", help="directory for the PNGs (default ./explain-superposition)")
    p.add_argument("--force", action="store_true", help="replace an earlier run's directory")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    from scribelm.inspect.superposition import (
        ToyModelSettings,
        angle_range,
        plot_angle_histograms,
        plot_feature_directions,
        random_unit_vectors,
        spread_apart,
        train_toy_model,
    )
    from scribelm.io import atomic_directory, claim_output_directory

    settings = [ToyModelSettings(n_features=args.features, d_hidden=args.hidden, sparsity=s, steps=args.steps,
                                 importance_decay=args.importance_decay, seed=args.seed) for s in args.sparsity]
    for s in settings:
        s.check()  # bad settings fail before minutes of work
    out = claim_output_directory(args.output, force=args.force, kind="superposition plots")
    result: dict = {}
    with atomic_directory(out, kind="superposition plots") as tmp:
        if args.only != "toy":
            vectors = random_unit_vectors(args.vectors, args.dim, seed=args.seed)
            spread = spread_apart(vectors, steps=args.spread_steps, seed=args.seed)
            result["counting"] = {"random": angle_range(vectors, epsilon=args.epsilon),
                                  "spread": angle_range(spread, epsilon=args.epsilon), "png": str(out / "angles.png")}
            plot_angle_histograms(vectors, spread, tmp / "angles.png")
        if args.only != "counting":
            result["toy"] = []
            for s in settings:
                toy = train_toy_model(s)
                name = f"toy-sparsity-{s.sparsity:g}.png"
                plot_feature_directions(toy, tmp / name, title=f"{s.n_features} features in {s.d_hidden} dimensions, sparsity {s.sparsity:g}")
                toy = {k: v for k, v in toy.items() if k not in ("W", "b")}
                result["toy"].append({"sparsity": s.sparsity, **toy, "png": str(out / name)})
    if args.json:
        print_json(result)
        return 0
    if "counting" in result:
        for label in ("random", "spread"):
            r = result["counting"][label]
            console.print(f"{r['n']:,} {label} unit vectors in {r['d']} dimensions: every pair between "
                          f"{r['min_angle']:.1f}° and {r['max_angle']:.1f}° (90° ± {r['largest_deviation']:.1f}°); "
                          f"{100 * r['within_epsilon']:.1f}% of pairs within 90° ± {r['epsilon']:g}°")
    for toy in result.get("toy", []):
        shape = f"; angles between neighbours {', '.join(f'{g:.0f}°' for g in toy['gaps'])}" if "gaps" in toy else ""
        console.print(f"toy model, sparsity {toy['sparsity']:g}: {toy['represented']} of {args.features} features "
                      f"represented in {args.hidden} dimensions{shape}")
    console.print(f"wrote the plots to {out}")
    return 0
