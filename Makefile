.PHONY: install test bench

install:
	python -m pip install torch==2.13.0
	python -m pip install -e '.[test,speech]'

test:
	python -m pytest -q

bench:
	python benchmarks/encode.py
	python benchmarks/convert.py
	python benchmarks/pretrain.py
