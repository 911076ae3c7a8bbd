"""The run configs (YAML) and their task files; installed as package data of ``metarl.experiments``
so that ``metarl train NAME`` finds them after ``pip install``, from any directory."""
