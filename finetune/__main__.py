from finetune.cli import command_line, main  # noqa: F401 (main: what this module offered before)

if __name__ == "__main__":
    command_line()
