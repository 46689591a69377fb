"""
Edit an image with a natural-language request.

    python edit.py photo.png "make her coat red and blur the background"
    python edit.py photo.png "it is far too dark" --adapter runs/default/adapter --preset cpu

State of this file: the planner step works today. It checks the image and the request, asks the decomposition
agent (the preset's planner, with a trained LoRA adapter when given) for actions, subjects and goals, and prints
them. The sequencing, region and editing agents that change the pixels land with the agent-team issue, so no image
is written yet.
"""
import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("instruction")
    ap.add_argument("--adapter", help="a LoRA adapter folder saved by train.py (default: the base planner)")
    ap.add_argument("--preset", default="cpu", choices=["cpu", "tiny"])
    ap.add_argument("--max_new_tokens", type=int, default=64)
    args = ap.parse_args(argv)

    from data import DataError, load_image
    if not args.instruction.strip():
        sys.exit("error: the instruction is empty; say what to change, e.g. \"make the sky bluer\"")
    try:
        image = load_image(args.image)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"image: {args.image} ({image.width}x{image.height})")

    from agents import load_planner
    from reward import parse
    from rollout import greedy_plans
    planner = load_planner(args.preset, adapter=args.adapter)
    print(f"planner: {args.preset}, " + (f"adapter {args.adapter}" if args.adapter else "base model, no adapter"))
    text = greedy_plans(planner, [args.instruction], args.max_new_tokens)[0]
    plan = parse(text)
    print(f"planner output: {text!r}")
    if not plan["ok"]:
        print("the output does not follow the <action><subject><goal> format (an untrained planner rarely does; "
              "train one with `make train`)")
    for i, edit in enumerate(zip(plan["action"], plan["subject"], plan["goal"])):
        print(f"  edit {i + 1}: action={edit[0]!r} subject={edit[1]!r} goal={edit[2]!r}")
    print("note: the editing agents are not built yet, so no image is written")
    return plan


if __name__ == "__main__":
    main()
