"""Push an existing model folder to the Hub: `python -m gpt_train.push OUT_DIR REPO_ID [--private]`.

Uploads what a training run with push_to_hub would (gpt_train.hub: the model folder's own files
and model card, not training_state/, metrics.jsonl, runs/, other files or symbolic links), as one
commit, waits for it and names the files that went up. The token comes
from HF_TOKEN or `hf auth login`.
"""
from gpt_train.cli import command_parser
from gpt_train.errors import UserError, exit_on_user_error, first_line
from gpt_train.config import check_repo_id
from gpt_train.hub import check_login, snapshot, upload_snapshot
from gpt_train.out_dir import check_model_folder
from gpt_train.store import readable

COMMIT_MESSAGE = "Upload model trained with gpt-train"


def push(out_dir, repo_id, private=False):
    out_dir = readable(out_dir, "OUT_DIR")  # a store's run: its newest checkpoint's model, cached here
    check_model_folder(out_dir, ": give the out_dir of a training run that has saved a checkpoint")
    check_repo_id(repo_id)
    check_login()
    copy, names = snapshot(out_dir)  # the same file selection as a training run's pushes
    try:
        return upload_snapshot(copy, repo_id, private, COMMIT_MESSAGE), names
    except Exception as e:  # network, permissions, quota: the user's to fix, the folder is untouched
        raise UserError(f"upload to {repo_id} failed: {first_line(e)}") from None


@exit_on_user_error
def main(argv=None):
    parser = command_parser("python -m gpt_train.push", __doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a model folder written by train.py (or save_pretrained)")
    parser.add_argument("repo_id", help="the Hub repository, 'user/name'; created if it does not exist")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    args = parser.parse_args(argv)
    url, names = push(args.out_dir, args.repo_id, args.private)
    print(f"pushed {args.out_dir} to {url}: {', '.join(names)}")


if __name__ == "__main__":
    main()
