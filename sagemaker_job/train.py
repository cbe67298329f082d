"""SageMaker training script of a ``source_dir`` upload: the toolkit runs it on every process."""

from ftpipe.sagemaker.entry import main

if __name__ == "__main__":
    main()
