"""Records -> tables, published references and plots (pandas, pyarrow, matplotlib; never torch)."""
