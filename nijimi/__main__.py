from nijimi.cli import main

raise SystemExit(main())
