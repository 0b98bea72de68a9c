from setuptools import find_packages, setup

setup(
    name="fairseq-evomoe",
    version="0.1.0",
    description="EvoMoE (dense-to-sparse gate, expert-diversify) and MoE baselines as a fairseq user dir",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["fairseq_evomoe", "fairseq_evomoe.*"]),
    # the README's versions: 3.11 (fairseq-fixed; what CI tests) and 3.10 (fairseq 0.12.2)
    python_requires=">=3.10,<3.12",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
    ],
    install_requires=[
        # official fairseq cannot be imported on Python >= 3.11; fairseq-fixed is the maintained fork
        'fairseq-fixed==0.12.3.1; python_version >= "3.11"',
        'fairseq==0.12.2; python_version < "3.11"',
        "torch>=1.13",
        # numpy<2: fairseq 0.12 (0.12.2 and the fairseq-fixed 0.12.3.1 fork alike) calls np.compat.long,
        # gone in NumPy 2, and np.percentile(interpolation=...), gone in NumPy 2.4: --sample-break-mode
        # eos and the hub's .score() (TokenBlockDataset) and --num-batch-buckets (LanguagePairDataset)
        # die on NumPy 2. tests/test_numpy_paths.py covers these paths.
        "numpy<2",
        "sacrebleu>=2.0",
        "sentencepiece",
        "matplotlib",
        # GLUE metrics (scripts/glue_eval.py: F1, Matthews, Pearson/Spearman); fairseq-fixed brings
        # them already, fairseq 0.12.2 does not
        "scikit-learn",
        "scipy",
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "filelock"]},
)
